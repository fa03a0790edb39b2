"""`AdapterStore` on Redis: the registry and the bundles every replica of a deployment shares.

Key schema (`P` is the key prefix, default `adapter-service:`; one deployment per prefix):

    P generation              STRING  registry-wide write counter, bumped by every write (resync compares it)
    P tasks                   SET     tasks that have at least one version
    P task:<t>:last           STRING  highest version ever allocated for <t>; survives delete (never reused)
    P task:<t>:versions       ZSET    live versions of <t> (member = score = version)
    P task:<t>:active         STRING  the active version of <t>
    P task:<t>:v:<n>          HASH    sha256, size, stored_at (ISO 8601), manifest (JSON), and where the bytes
                                      are: `bundle` (the bytes) or `object` (a bucket key; `service.cluster.blobs`)
    P objects                 HASH    bucket key -> how many registry entries name it (what GC must keep)
    P objects:pending         ZSET    bucket keys a writer reserved, until it names them (`object_refs`)
    P events                  channel change events (`service.cluster.events`)

Writes are Lua scripts: Redis runs a script alone, so no reader sees half of a write, and a version's
blob is always written before the pointer that names it (and a deletion drops the pointer first), so even
a script stopped midway by an error never leaves a pointer to a missing blob. Where the blob goes is one
object (`blobs`, `service.cluster.blobs`): inline in the entry (this class's default), or an object in a
bucket written and verified before the script runs (`service.cluster.s3_store`).

Durability: a write returns only after Redis answered it. When the server has `WAITAOF` (Redis >= 7.2)
the store also waits, on the same connection, until the write is fsynced to the local AOF, so an
acknowledged upload survives a power loss whatever `appendfsync` says; on older servers it relies on the
server's `appendfsync always` (what deploy/ configures). After the write, the store publishes a change
event (best effort: a replica that misses it catches up on its next generation check).

Standalone Redis (or Sentinel) only: the scripts touch keys of several tasks plus the global counter, which
Redis Cluster would spread over slots.
"""

from __future__ import annotations

import hashlib
import logging
from datetime import datetime, timezone
from enum import Enum
from typing import TYPE_CHECKING, Any, cast

import redis
from redis.commands.core import Script

from service.bundles.codec import read_manifest
from service.bundles.manifest import Manifest, check_task_name
from service.bundles.store import VersionInfo
from service.cluster.blobs import BlobKind, Blobs, InlineBlobs
from service.cluster.connection import connect, default_replica_id, redis_errors
from service.cluster.events import ChangeEvent, EventKind, events_channel, publish_event
from service.cluster.object_refs import RELEASE_ONE, ObjectRefs
from service.errors import BundleInvalid, StoreUnavailable, TaskNotFound, VersionNotFound

if TYPE_CHECKING:
    from service.settings import ServiceSettings

log = logging.getLogger(__name__)

# KEYS: last, versions, active, tasks, generation, objects, pending objects, pending counts. ARGV: version key prefix, task, blob field
# ('bundle' or 'object'), its value, sha256, size, stored_at, manifest, activate ("1"/"0").
# Returns {version, generation}.
_PUT = """
local v = redis.call('INCR', KEYS[1])
redis.call('HSET', ARGV[1] .. v, ARGV[3], ARGV[4], 'sha256', ARGV[5], 'size', ARGV[6],
           'stored_at', ARGV[7], 'manifest', ARGV[8])
if ARGV[3] == 'object' then
  redis.call('HINCRBY', KEYS[6], ARGV[4], 1)
  release_one(KEYS[7], KEYS[8], ARGV[4])
end
redis.call('ZADD', KEYS[2], v, v)
redis.call('SADD', KEYS[4], ARGV[2])
if ARGV[9] == '1' then redis.call('SET', KEYS[3], v) end
return {v, redis.call('INCR', KEYS[5])}
"""

# KEYS: versions, active, generation. ARGV: version. Returns the new generation, -1 (no such task) or
# 0 (no such version).
_SET_ACTIVE = """
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  if redis.call('ZCARD', KEYS[1]) == 0 then return -1 end
  return 0
end
redis.call('SET', KEYS[2], ARGV[1])
return redis.call('INCR', KEYS[3])
"""

# KEYS: versions, active, tasks, generation, objects. ARGV: version key prefix, task. Returns the new
# generation, or 0 when the task has no version. The pointer goes first, the blobs after it; bucket objects
# lose a reference here and are removed later by the garbage collector (service.cluster.gc).
_DELETE = """
local versions = redis.call('ZRANGE', KEYS[1], 0, -1)
if #versions == 0 then return 0 end
redis.call('DEL', KEYS[2])
for _, v in ipairs(versions) do
  local o = redis.call('HGET', ARGV[1] .. v, 'object')
  if o and redis.call('HINCRBY', KEYS[5], o, -1) <= 0 then redis.call('HDEL', KEYS[5], o) end
  redis.call('UNLINK', ARGV[1] .. v)
end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[3], ARGV[2])
return redis.call('INCR', KEYS[4])
"""

# KEYS: last, versions, tasks, generation, objects, pending objects, pending counts. ARGV: version key, task, version, blob field, its
# value, sha256, size, stored_at, manifest. Returns {outcome code, generation or 0}; codes as in
# ImportOutcome.
_IMPORT = """
local function refused(code)  -- the writer's reservation of the object goes on every path, named or not
  if ARGV[4] == 'object' then release_one(KEYS[6], KEYS[7], ARGV[5]) end
  return {code, 0}
end
local existing = redis.call('HGET', ARGV[1], 'sha256')
if existing then
  if existing == ARGV[6] then return refused(0) end
  return refused(1)
end
local v = tonumber(ARGV[3])
if v <= tonumber(redis.call('GET', KEYS[1]) or '0') then return refused(2) end
redis.call('HSET', ARGV[1], ARGV[4], ARGV[5], 'sha256', ARGV[6], 'size', ARGV[7],
           'stored_at', ARGV[8], 'manifest', ARGV[9])
if ARGV[4] == 'object' then
  redis.call('HINCRBY', KEYS[5], ARGV[5], 1)
  release_one(KEYS[6], KEYS[7], ARGV[5])
end
redis.call('ZADD', KEYS[2], v, v)
redis.call('SADD', KEYS[3], ARGV[2])
redis.call('SET', KEYS[1], v)
return {3, redis.call('INCR', KEYS[4])}
"""


_INLINE = InlineBlobs()


class ImportOutcome(Enum):
    """What `import_version` did with one version (codes returned by the import script)."""

    UNCHANGED = 0  # already there with the same bytes
    CONFLICT = 1  # already there with other bytes: left alone
    RESERVED = 2  # the number was used before (then deleted): never reused, left alone
    WRITTEN = 3


class RedisAdapterStore:
    """`AdapterStore` on Redis. Thread-safe (a connection pool); every Redis failure is StoreUnavailable.

    Replies: `connect` makes clients that leave replies undecoded, so every string reply is bytes; redis-py
    types them `bytes | str` (the client type does not say which), hence the casts to bytes below.
    """

    def __init__(
        self,
        url: str,
        *,
        key_prefix: str = "adapter-service:",
        timeout_s: float = 2.0,
        replica_id: str | None = None,
        announce: bool = True,
        max_connections: int = 32,
    ):
        """`announce=False`: do not publish change events (replicas then learn of writes by resync only).
        New versions' bytes go inline into Redis (`blobs`; `S3RedisAdapterStore` puts them in a bucket)."""
        self.url = url
        self.key_prefix = key_prefix
        self.timeout_s = timeout_s
        self.replica_id = replica_id or default_replica_id()
        self.announce = announce
        self.events_channel = events_channel(key_prefix)
        self.client = connect(url, timeout_s=timeout_s, max_connections=max_connections)
        self._put_script = self.client.register_script(RELEASE_ONE + _PUT)
        self._set_active_script = self.client.register_script(_SET_ACTIVE)
        self._delete_script = self.client.register_script(_DELETE)
        self._import_script = self.client.register_script(RELEASE_ONE + _IMPORT)
        self._waitaof: bool | None = None  # None: not probed yet
        self.blobs: Blobs = _INLINE
        self.refs = ObjectRefs(self.client, key_prefix)  # which bucket objects the entries name
        self._object_keys = [self.refs.objects_key, self.refs.pending_key, self.refs.counts_key]

    @classmethod
    def from_settings(cls, settings: ServiceSettings) -> RedisAdapterStore:
        if not settings.redis_url:
            raise ValueError("redis_url is not set")
        return cls(settings.redis_url, key_prefix=settings.redis_key_prefix, timeout_s=settings.redis_timeout_s,
                   replica_id=settings.replica_id)

    def close(self) -> None:
        self.client.close()
        self.client.connection_pool.disconnect()

    # --- keys ---------------------------------------------------------------------------------

    def _key(self, name: str) -> str:
        return f"{self.key_prefix}{name}"

    def _task_key(self, task: str, name: str) -> str:
        return f"{self.key_prefix}task:{check_task_name(task)}:{name}"

    def _version_key(self, task: str, version: int) -> str:
        return self._task_key(task, f"v:{int(version)}")

    # --- reads --------------------------------------------------------------------------------

    def get_bytes(self, task: str, version: int) -> bytes:
        key = self._version_key(task, version)
        kinds = list(BlobKind)
        with redis_errors():
            fields = cast("list[bytes | None]", self.client.hmget(key, ["sha256", *(k.value for k in kinds)]))
        sha, locations = fields[0], fields[1:]
        if sha is None:
            raise self._missing(task, version)
        for kind, location in zip(kinds, locations):
            if location is not None:
                return self._blobs_of(kind, task, version).load(task, sha.decode(), location)
        raise StoreUnavailable(f"the registry entry of {task} v{version} names no bytes (written by a newer version "
                               "of the service?)")

    def get_info(self, task: str, version: int) -> VersionInfo:
        key = self._version_key(task, version)
        with redis_errors():
            fields = self.client.hmget(key, ["sha256", "size", "stored_at", "manifest"])
        sha, size, stored_at, manifest = cast("list[bytes | None]", fields)
        if sha is None:
            raise self._missing(task, version)
        # the put and import scripts write the four fields together
        assert size is not None and stored_at is not None and manifest is not None
        return VersionInfo(
            task=task,
            version=int(version),
            sha256=sha.decode(),
            size_bytes=int(size),
            stored_at=datetime.fromisoformat(stored_at.decode()),
            manifest=Manifest.model_validate_json(manifest),
        )

    def list_tasks(self) -> list[str]:
        with redis_errors():
            members = self.client.smembers(self._key("tasks"))
        return sorted(m.decode() for m in cast("set[bytes]", members))

    def list_versions(self, task: str) -> list[int]:
        key = self._task_key(task, "versions")
        with redis_errors():
            members = self.client.zrange(key, 0, -1)
        if not members:
            raise TaskNotFound(task)
        return [int(m) for m in cast("list[bytes]", members)]

    def get_active(self, task: str) -> int:
        key = self._task_key(task, "active")
        with redis_errors():
            value = self.client.get(key)
        if value is None:
            raise TaskNotFound(task)
        return int(value)

    def generation(self) -> int:
        with redis_errors():
            return int(self.client.get(self._key("generation")) or 0)

    def ping(self) -> None:
        with redis_errors():
            self.client.ping()
        self.blobs.ping()

    # --- writes -------------------------------------------------------------------------------

    def put(self, task: str, data: bytes, *, activate: bool = True) -> VersionInfo:
        manifest = _manifest_for(task, data)
        sha = hashlib.sha256(data).hexdigest()
        stored_at = datetime.now(timezone.utc)
        location = self.blobs.store(task, sha, data)  # the bytes first: no entry ever names missing bytes
        keys = [self._task_key(task, n) for n in ("last", "versions", "active")] + [
            self._key("tasks"), self._key("generation"), *self._object_keys,
        ]
        args = [
            self._task_key(task, "v:"), task, self.blobs.kind.value, location, sha, len(data), stored_at.isoformat(),
            manifest.model_dump_json(), "1" if activate else "0",
        ]
        reply: list[int] = self._write(self._put_script, keys, args)  # {version, generation}
        version, generation = reply
        self._announce(EventKind.UPLOADED, task, version, generation)
        return VersionInfo(task, version, sha, len(data), stored_at, manifest)

    def set_active(self, task: str, version: int) -> None:
        keys = [self._task_key(task, "versions"), self._task_key(task, "active"), self._key("generation")]
        generation: int = self._write(self._set_active_script, keys, [int(version)])
        if generation == -1:
            raise TaskNotFound(task)
        if generation == 0:
            raise VersionNotFound(task, version)
        self._announce(EventKind.ACTIVATED, task, int(version), generation)

    def delete_task(self, task: str) -> None:
        keys = [self._task_key(task, "versions"), self._task_key(task, "active"), self._key("tasks"),
                self._key("generation"), self.refs.objects_key]
        generation: int = self._write(self._delete_script, keys, [self._task_key(task, "v:"), task])
        if generation == 0:
            raise TaskNotFound(task)
        self._announce(EventKind.DELETED, task, None, generation)

    def import_version(self, task: str, version: int, data: bytes) -> ImportOutcome:
        """Store `data` as exactly `task@version` (seeding from another store), never activating it.

        Idempotent: the same bytes again are UNCHANGED. Other bytes under an existing number are a
        CONFLICT, and a number allocated before but absent now is RESERVED: both leave Redis untouched,
        because `task@version` must name one bundle forever.
        """
        manifest = _manifest_for(task, data)
        if int(version) < 1:
            raise VersionNotFound(task, version)
        keys = [self._task_key(task, "last"), self._task_key(task, "versions"), self._key("tasks"),
                self._key("generation"), *self._object_keys]
        sha = hashlib.sha256(data).hexdigest()
        args = [
            self._version_key(task, version), task, int(version), self.blobs.kind.value,
            self.blobs.store(task, sha, data), sha, len(data), datetime.now(timezone.utc).isoformat(),
            manifest.model_dump_json(),
        ]
        reply: list[int] = self._write(self._import_script, keys, args)  # {outcome code, generation or 0}
        code, generation = reply
        outcome = ImportOutcome(code)
        if outcome is ImportOutcome.WRITTEN:
            self._announce(EventKind.UPLOADED, task, int(version), generation)
        return outcome

    # --- helpers ------------------------------------------------------------------------------

    def _write(self, script: Script, keys: list[str], args: list[Any]) -> Any:
        """Run a write script, then wait until it is durable, both on one connection (WAITAOF counts the
        writes of its own connection). Returns the script's reply, whose shape depends on the script."""
        with redis_errors(), self.client.client() as conn:
            result = script(keys=keys, args=args, client=conn)
            self._wait_durable(conn)
        return result

    def _wait_durable(self, conn: redis.Redis) -> None:
        if self._waitaof is False:
            return
        try:
            local, _replicas = conn.execute_command("WAITAOF", 1, 0, max(1, int(self.timeout_s * 1000)))
        except redis.ResponseError as exc:  # Redis < 7.2 (unknown command) or AOF off
            self._waitaof = False
            try:
                aof = conn.info("persistence").get("aof_enabled")
            except redis.RedisError:  # INFO may be disabled (managed Redis): say nothing about the AOF
                aof = None
            log.warning("Redis cannot confirm fsyncs (%s): acknowledged writes rely on its appendfsync setting%s",
                        exc, "; its AOF is OFF, so a Redis restart can lose acknowledged uploads" if aof == 0 else "")
            return
        self._waitaof = True
        if int(local) < 1:
            raise StoreUnavailable(
                f"adapter store (Redis) did not confirm the write reached its disk within {self.timeout_s:g}s"
            )

    def _announce(self, kind: EventKind, task: str, version: int | None, generation: int) -> None:
        if not self.announce:
            return
        event = ChangeEvent(kind=kind, task=task, version=version, generation=generation, origin=self.replica_id)
        try:
            with redis_errors():
                publish_event(self.client, self.events_channel, event)
        except StoreUnavailable as exc:  # the write itself is durable; replicas catch up by resync
            log.warning("could not publish %s event for %s: %s", kind.value, task, exc.message)

    def _blobs_of(self, kind: BlobKind, task: str, version: int) -> Blobs:
        """The reader of an entry whose bytes are of `kind`: inline ones anyone can read, objects need a bucket."""
        if kind is BlobKind.INLINE:
            return _INLINE
        if self.blobs.kind is kind:
            return self.blobs
        raise StoreUnavailable(f"the bytes of {task} v{version} are in an object store, and this replica has none "
                               "configured (ADAPTER_SERVICE_S3_ENDPOINT)")

    def _missing(self, task: str, version: int) -> Exception:
        with redis_errors():
            live = self.client.zcard(self._task_key(task, "versions"))
        return VersionNotFound(task, version) if live else TaskNotFound(task)


def _manifest_for(task: str, data: bytes) -> Manifest:
    """The manifest of `data`, which must be a bundle for `task` (same checks as the local store)."""
    check_task_name(task)
    manifest = read_manifest(data)
    if manifest.task != task:
        raise BundleInvalid("task_mismatch", f"bundle is for task '{manifest.task}', not '{task}'")
    return manifest
