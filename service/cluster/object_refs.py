"""What keeps an object in the bucket safe from the garbage collector, kept in Redis beside the registry.

An object may be collected only when no registry entry names it and no writer is about to name it. The
registry scripts (`service.cluster.redis_store`) keep `P objects`, a hash of key -> number of entries naming
it, in the same transaction as the entries themselves. What they cannot see is an upload between its
object write and its registry write; content-addressed keys make that sharper, since an upload of bytes
identical to a deleted version rewrites the very key the collector may be deleting. So writer and
collector meet here, each step one Lua script that Redis runs alone:

    writer:     reserve(key)  -> pending until a deadline          then write the object, then the entry
    collector:  claim(key)    -> refused if named or pending       then delete the object, then release(key)

`reserve` waits while a claim on the same key is in progress (a marker that expires on its own if the
collector dies), so a writer's object write comes either before the claim (which then sees the pending
reservation and keeps the object) or after the delete (which then cannot remove it).

Reservations are counted per key: the registry write that names a key drops ONE reservation (its own), and
the key stays pending while another writer of the same bytes is still between its object write and its
registry write (a client's retry of a slow upload, say), so deleting the first entry cannot expose the
object to the collector. (`RELEASE_ONE` is the Lua the registry scripts run for it.) A writer that dies keeps
its key pending until the deadline passes; the collector then ignores and purges it.

Keys (prefix `P` as the registry's): `P objects` (HASH), `P objects:pending` (ZSET, score = the latest
deadline in ms of Redis time), `P objects:pending:count` (HASH, live reservations per key),
`P objects:deleting:<key>` (STRING with a TTL).
"""

from __future__ import annotations

import time
from typing import cast

import redis

from service.cluster.connection import redis_errors
from service.errors import StoreUnavailable

# KEYS: pending, deleting marker, pending counts. ARGV: object key, reservation ms. Returns 0 while a claim
# holds the key.
_RESERVE = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
local t = redis.call('TIME')
local deadline = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[2])
local current = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1]) or '0')
if deadline > current then redis.call('ZADD', KEYS[1], deadline, ARGV[1]) end
redis.call('HINCRBY', KEYS[3], ARGV[1], 1)
return 1
"""

RELEASE_ONE = """
local function release_one(pending, counts, key)
  if redis.call('HINCRBY', counts, key, -1) <= 0 then
    redis.call('HDEL', counts, key)
    redis.call('ZREM', pending, key)
  end
end
"""
"""Lua for the registry scripts that name an object: drop the naming writer's reservation, and the key's
pending entry with the last one."""

# KEYS: objects, pending, deleting marker, pending counts. ARGV: object key, marker ms. Returns 1 if the key may
# be deleted (named by no entry, no live reservation).
_CLAIM = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if tonumber(redis.call('ZSCORE', KEYS[2], ARGV[1]) or '0') > now then return 0 end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[4], ARGV[1])
if not redis.call('SET', KEYS[3], '1', 'NX', 'PX', ARGV[2]) then return 0 end
return 1
"""

# KEYS: pending, pending counts. Drops reservations whose deadline passed (their writers finished or died).
_PURGE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
for _, key in ipairs(expired) do redis.call('HDEL', KEYS[2], key) end
return redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
"""

RESERVATION_S = 600.0  # longer than any upload takes from object write to registry write
CLAIM_S = 30.0  # the least a claim is held; the collector holds it longer where the bucket's calls may last longer


class ObjectRefs:
    """The writer/collector handshake above, on a registry's Redis client and key prefix."""

    def __init__(self, client: redis.Redis, key_prefix: str):
        self.client = client
        self.objects_key = f"{key_prefix}objects"
        self.pending_key = f"{key_prefix}objects:pending"
        self.counts_key = f"{key_prefix}objects:pending:count"
        self._marker_prefix = f"{key_prefix}objects:deleting:"
        self._reserve = client.register_script(_RESERVE)
        self._claim = client.register_script(_CLAIM)
        self._purge = client.register_script(_PURGE)

    def reserve(self, key: str, *, wait_s: float = CLAIM_S) -> None:
        """Keep `key` from collection for RESERVATION_S; waits out a collector deleting it right now."""
        deadline = time.monotonic() + wait_s
        while True:
            with redis_errors():
                if self._reserve(keys=[self.pending_key, self._marker(key), self.counts_key],
                                 args=[key, int(RESERVATION_S * 1000)]):
                    return
            if time.monotonic() > deadline:
                raise StoreUnavailable(f"object {key} is being garbage-collected and was not released in {wait_s:g}s")
            time.sleep(0.02)

    def claim(self, key: str, *, hold_s: float = CLAIM_S) -> bool:
        """True when `key` is named by no entry and no reservation: the caller may delete it, then `release`. The
        claim lapses by itself after `hold_s` (a collector that dies does not block writers for ever), so it must
        outlast the delete: a writer waiting on it would otherwise write the object while the delete is still
        on its way, and lose it."""
        with redis_errors():
            return bool(self._claim(keys=[self.objects_key, self.pending_key, self._marker(key), self.counts_key],
                                    args=[key, int(hold_s * 1000)]))

    def holds_claim(self, key: str) -> bool:
        """Whether a claim on `key` is still in force (not released and not lapsed)."""
        with redis_errors():
            return bool(self.client.exists(self._marker(key)))

    def release(self, key: str) -> None:
        with redis_errors():
            self.client.delete(self._marker(key))

    def referenced(self) -> dict[str, int]:
        """Every key the registry names, with how many entries name it."""
        with redis_errors():
            raw = cast("dict[bytes, bytes]", self.client.hgetall(self.objects_key))  # undecoded replies
        return {k.decode(): int(v) for k, v in raw.items()}

    def purge_expired(self) -> int:
        with redis_errors():
            return int(self._purge(keys=[self.pending_key, self.counts_key]))

    def _marker(self, key: str) -> str:
        return self._marker_prefix + key
