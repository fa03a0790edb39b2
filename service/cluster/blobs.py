"""Where a version's bundle bytes live: the one thing that differs between the Redis-only store and the
Redis + object-store one. Everything else (versions, active pointers, generation, events) is the registry
in `service.cluster.redis_store`, shared by both.

A registry entry (`P task:<t>:v:<n>`, a hash) names its bytes in exactly one field, whose name is the
blob kind:

    bundle   the bytes themselves, inline in Redis (`InlineBlobs`)
    object   the key of an immutable object in a bucket (`service.cluster.s3_store.ObjectBlobs`)

A store writes new versions with its own kind, and reads entries of either kind (so a deployment can move
its bytes from Redis to a bucket while it serves: `adapter-service store migrate`).
"""

from __future__ import annotations

from enum import Enum
from typing import Protocol


class BlobKind(str, Enum):
    """The registry field that names a version's bytes (values are the field names)."""

    INLINE = "bundle"
    OBJECT = "object"


class Blobs(Protocol):
    """One place bundle bytes can live."""

    kind: BlobKind

    def store(self, task: str, sha256: str, data: bytes) -> bytes | str:
        """Make `data` durable here; returns what the registry entry keeps in its `kind` field. Runs before
        the registry write, so no entry ever names bytes that are not there yet."""

    def load(self, task: str, sha256: str, location: bytes) -> bytes:
        """The bytes of an entry whose `kind` field holds `location` (checked against `sha256` when they
        come from elsewhere than Redis)."""

    def ping(self) -> None:
        """Raise StoreUnavailable when the bytes cannot be reached."""


class InlineBlobs:
    """Bytes inside the registry entry: nothing to write first, nothing to fetch after."""

    kind = BlobKind.INLINE

    def store(self, task: str, sha256: str, data: bytes) -> bytes:
        return data

    def load(self, task: str, sha256: str, location: bytes) -> bytes:
        return location

    def ping(self) -> None:
        """Reached with the registry itself."""
