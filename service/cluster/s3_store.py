"""`AdapterStore` with the registry in Redis and the bundle bytes in an S3-compatible bucket.

Redis keeps what it is good at (versions, active pointers, sha256, size, manifest, the generation counter,
change events: a few hundred bytes per version); the bucket keeps the ~3 MB bundles, which in Redis would
be held in memory, replicated and rewritten by the AOF. The registry logic is `RedisAdapterStore`'s own;
this store only swaps where bytes go (`ObjectBlobs`), as `service.cluster.blobs` describes.

An upload: reserve the key against the garbage collector, write the object and read back its checksum
(`S3Bucket.put_verified`), then the registry transaction, fsynced (WAITAOF or `appendfsync always`). Only
then is it acknowledged, so a crash at any point leaves either nothing in the registry or an entry whose
object is in the bucket; at worst an object no entry names, which `service.cluster.gc` removes later.

Reads go through a bounded on-disk cache per replica (`DiskBlobCache`), so a restart or an eviction from
the memory caches does not refetch. Entries whose bytes are still inline in Redis (a deployment being
migrated) are read from Redis; `move_to_object` moves one such entry into the bucket.
"""

from __future__ import annotations

import hashlib
import tempfile
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from service.cluster.blob_cache import DiskBlobCache
from service.cluster.blobs import BlobKind
from service.cluster.connection import redis_errors
from service.cluster.object_refs import RELEASE_ONE, ObjectRefs
from service.cluster.object_store import S3Bucket
from service.cluster.redis_store import RedisAdapterStore
from service.errors import StoreUnavailable

if TYPE_CHECKING:
    from service.settings import ServiceSettings

# KEYS: version key, objects, pending objects, pending counts. ARGV: sha256 the bytes were checked against, object key.
# Returns 1 (moved), 0 (the entry is gone or names other bytes now), 2 (already an object).
_RELOCATE = """
local outcome = 1
if redis.call('HGET', KEYS[1], 'sha256') ~= ARGV[1] then
  outcome = 0
elseif redis.call('HEXISTS', KEYS[1], 'object') == 1 then
  outcome = 2
else
  redis.call('HSET', KEYS[1], 'object', ARGV[2])
  redis.call('HDEL', KEYS[1], 'bundle')
  redis.call('HINCRBY', KEYS[2], ARGV[2], 1)
end
release_one(KEYS[3], KEYS[4], ARGV[2])  -- the writer's reservation goes on every path, named or not
return outcome
"""


class MoveOutcome(Enum):
    """What `move_to_object` did with one version (codes returned by the relocation script)."""

    GONE = 0  # deleted meanwhile: nothing to move
    MOVED = 1
    ALREADY = 2  # its bytes were in the bucket already


class ObjectBlobs:
    """Bundle bytes as objects in a bucket, read through a local disk cache."""

    kind = BlobKind.OBJECT

    def __init__(self, bucket: S3Bucket, refs: ObjectRefs, cache: DiskBlobCache | None = None):
        self.bucket, self.refs, self.cache = bucket, refs, cache

    def store(self, task: str, sha256: str, data: bytes) -> str:
        key = self.bucket.key_for(task, sha256)
        self.refs.reserve(key)
        self.bucket.put_verified(key, data, sha256)
        if self.cache is not None:
            self.cache.put(sha256, data)
        return key

    def load(self, task: str, sha256: str, location: bytes) -> bytes:
        if self.cache is not None:
            cached = self.cache.get(sha256)
            if cached is not None:
                return cached
        data = self.bucket.get(location.decode(), sha256)
        if self.cache is not None:
            self.cache.put(sha256, data)
        return data

    def ping(self) -> None:
        self.bucket.ping()


class S3RedisAdapterStore(RedisAdapterStore):
    """`RedisAdapterStore` whose new versions' bytes go to `bucket`. Every bucket failure is StoreUnavailable."""

    def __init__(self, url: str, bucket: S3Bucket, *, cache: DiskBlobCache | None = None, **kwargs: Any):
        super().__init__(url, **kwargs)
        self.bucket = bucket
        self.blobs = ObjectBlobs(bucket, self.refs, cache)
        self._relocate_script = self.client.register_script(RELEASE_ONE + _RELOCATE)

    @classmethod
    def from_settings(cls, settings: ServiceSettings) -> S3RedisAdapterStore:
        if not settings.redis_url or not settings.s3_endpoint:
            raise ValueError("redis_url and s3_endpoint must both be set")
        cache = None
        if settings.blob_cache_bytes > 0:
            folder = settings.blob_cache_dir or Path(tempfile.gettempdir()) / "adapter-service-blobs"
            cache = DiskBlobCache(folder, settings.blob_cache_bytes)
        return cls(settings.redis_url, S3Bucket.from_settings(settings), cache=cache,
                   key_prefix=settings.redis_key_prefix, timeout_s=settings.redis_timeout_s,
                   replica_id=settings.replica_id)

    @property
    def cache(self) -> DiskBlobCache | None:
        return cast(ObjectBlobs, self.blobs).cache

    def location(self, task: str, version: int) -> BlobKind:
        """Where `task@version`'s bytes are now (TaskNotFound / VersionNotFound when it does not exist)."""
        with redis_errors():
            inline = self.client.hexists(self._version_key(task, version), BlobKind.INLINE.value)
            exists = inline or self.client.hexists(self._version_key(task, version), "sha256")
        if not exists:
            raise self._missing(task, version)
        return BlobKind.INLINE if inline else BlobKind.OBJECT

    def move_to_object(self, task: str, version: int) -> MoveOutcome:
        """Copy an inline version's bytes into the bucket (verified), then point its entry at the object in one
        script. Readers see either the inline bytes or the object, both complete; no event, no new generation:
        the version's bytes are the same."""
        key = self._version_key(task, version)
        with redis_errors():
            data, obj, sha = cast("list[bytes | None]", self.client.hmget(key, ["bundle", "object", "sha256"]))
        if sha is None:
            return MoveOutcome.GONE
        if obj is not None or data is None:
            return MoveOutcome.ALREADY
        if hashlib.sha256(data).hexdigest() != sha.decode():
            raise StoreUnavailable(f"{task} v{version}: the bytes in Redis do not match their sha256; not moved")
        object_key = self.blobs.store(task, sha.decode(), data)
        code: int = self._write(self._relocate_script, [key, self.refs.objects_key, self.refs.pending_key, self.refs.counts_key],
                                 [sha, object_key])
        return MoveOutcome(code)
