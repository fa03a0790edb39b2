"""Device cache of task adapters + heads: `task@version` -> slot, bounded by bytes and slots, evicting in
segmented-LRU order (`service.runtime.eviction`: tasks used again outlive tasks used once).

- The cache owns the task -> slot map; layers only see slot indices.
- Lazy: a task loads on first use; one load per key at a time (per-key lock, checked again after taking it).
- Entries pinned by in-flight batches are never evicted; eviction is a callback, in the eviction order.
- A load that finds every slot (or byte) pinned waits for a release, up to `admission_timeout_s`, instead
  of failing: the batcher admits only batches that fit (`service.runtime.batcher`), so such waits are short
  (an upload's smoke test or a pre-load holding a slot for one forward).
- Keys include the version, so a new version is never served from an old version's weights.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import torch

from service.bundles.codec import Bundle
from service.bundles.manifest import Manifest
from service.errors import BundleInvalid, CacheFull
from service.kinds.heads import TaskHead
from service.modeling.heads import build_head
from service.modeling.slot_pool import SlotPool
from service.runtime.eviction import SegmentedLru

Key = tuple[str, int]


class EntryState(Enum):
    """Lifecycle of a cache entry."""

    LOADING = "loading"  # slot reserved, weights being copied in
    READY = "ready"  # servable
    EVICTED = "evicted"  # slot returned to the pool (evicted, or its load failed); the entry object is dead


@dataclass(eq=False)
class CacheEntry:
    task: str
    version: int
    slot: int
    nbytes: int
    manifest: Manifest
    head: TaskHead
    state: EntryState = EntryState.LOADING
    pins: int = 0
    doomed: bool = False  # evict as soon as the last pin is released (task deleted)

    @property
    def key(self) -> Key:
        return (self.task, self.version)

    @property
    def stored(self) -> bool:
        """A stored version, not an upload's smoke test (negative versions: used once, never reloaded)."""
        return self.version > 0


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    load_failures: int = 0
    load_seconds_total: float = 0.0
    slot_waits: int = 0  # loads that found every slot or byte pinned and waited for a release
    slot_wait_seconds_total: float = 0.0
    slot_wait_timeouts: int = 0  # waits that ran out of `admission_timeout_s` (answered CacheFull)
    resident_bytes: int = 0
    resident_entries: int = 0


def footprint(manifest: Manifest, dtype: torch.dtype) -> int:
    """Device bytes one task's adapter + head take in the cache when computed in `dtype` (what the byte
    budget counts; known from the manifest alone, so the batcher can plan with it before a load)."""
    return dtype.itemsize * manifest.tensor_elements


class AdapterCache:
    """Resident task weights, pinned while in use, evicted in segmented-LRU order. Thread-safe."""

    def __init__(
        self,
        pool: SlotPool,
        fetch: Callable[[str, int], Bundle],
        *,
        max_bytes: int,
        max_slots: int,
        device: torch.device,
        dtype: torch.dtype,
        on_evict: Callable[[CacheEntry], None] | None = None,
        on_load: Callable[[CacheEntry, float], None] | None = None,
        admission_timeout_s: float = 30.0,
    ):
        if max_slots > pool.num_slots - 1:
            raise ValueError(f"max_slots {max_slots} exceeds the pool's {pool.num_slots - 1} slots")
        self.pool, self._fetch = pool, fetch
        self.max_bytes, self.max_slots = max_bytes, max_slots
        self.device, self.dtype = device, dtype
        self._on_evict_hook = on_evict
        self._on_load_hook = on_load
        self.admission_timeout_s = admission_timeout_s
        self._entries: dict[Key, CacheEntry] = {}
        self._order: SegmentedLru[Key] = SegmentedLru(max_slots)  # eviction order of the entries
        self._free_slots = list(range(max_slots, 0, -1))  # pop() gives the lowest free slot
        self._lock = threading.Lock()
        self._released = threading.Condition(self._lock)  # notified whenever a pin or a slot is given back
        self._key_locks: dict[Key, tuple[threading.Lock, int]] = {}  # key -> (lock, threads using it)
        # Heads of entries evicted to make room (not of deleted or replaced versions), kept for a reload:
        # building a head module costs about as much as the rest of a load. At most 4 per slot, LRU.
        self._spare_heads: OrderedDict[Key, TaskHead] = OrderedDict()
        self.stats = CacheStats()

    # --- public --------------------------------------------------------------------------------

    def acquire(
        self, task: str, version: int, bundle: Bundle | None = None, *, wait_s: float | None = None,
    ) -> CacheEntry:
        """The READY entry for `task@version`, pinned (call `release` when done); loads it on a miss, from
        `bundle` when given (an upload being smoke-tested or pre-warmed) else through `fetch`. A load that
        finds everything pinned waits up to `wait_s` (default `admission_timeout_s`) for a release."""
        key = (task, version)
        entry = self._pin_if_ready(key)
        if entry is not None:
            return entry
        with self._lock:
            key_lock, users = self._key_locks.get(key, (threading.Lock(), 0))
            self._key_locks[key] = (key_lock, users + 1)
        try:
            with key_lock:
                entry = self._pin_if_ready(key)  # someone else may have loaded it while we waited
                if entry is not None:
                    return entry
                return self._load(task, version, bundle, self.admission_timeout_s if wait_s is None else wait_s)
        finally:
            with self._lock:  # the lock map holds only keys being loaded right now
                key_lock, users = self._key_locks[key]
                if users == 1:
                    del self._key_locks[key]
                else:
                    self._key_locks[key] = (key_lock, users - 1)

    def footprint(self, manifest: Manifest) -> int:
        """Bytes `manifest`'s task takes in this cache (see `footprint`)."""
        return footprint(manifest, self.dtype)

    def release(self, entry: CacheEntry) -> None:
        with self._lock:
            entry.pins -= 1
            assert entry.pins >= 0, "release without acquire"
            if entry.pins == 0:
                if entry.doomed and entry.state is EntryState.READY:
                    self._evict(entry)
                self._released.notify_all()

    def invalidate(self, task: str, keep_version: int | None = None) -> int:
        """Drop every resident version of `task` (but `keep_version`); pinned ones go when released.
        Returns how many entries were affected."""
        with self._lock:
            for key in [k for k in self._spare_heads if k[0] == task and k[1] != keep_version]:
                del self._spare_heads[key]  # deleted or replaced: not asked for again
            victims = [e for e in self._entries.values() if e.task == task and e.version != keep_version]
            for e in victims:
                e.doomed = True
                if e.pins == 0 and e.state is EntryState.READY:
                    self._evict(e)
            return len(victims)

    def invalidate_version(self, task: str, version: int) -> None:
        """Drop `task@version` (now, or when its last pin is released)."""
        with self._lock:
            entry = self._entries.get((task, version))
            if entry is not None:
                entry.doomed = True
                if entry.pins == 0 and entry.state is EntryState.READY:
                    self._evict(entry)

    def resident(self) -> list[CacheEntry]:
        with self._lock:
            return [e for e in self._entries.values() if e.state is EntryState.READY]

    def is_resident(self, task: str, version: int) -> bool:
        with self._lock:
            e = self._entries.get((task, version))
            return e is not None and e.state is EntryState.READY

    # --- internals -----------------------------------------------------------------------------

    def _pin_if_ready(self, key: Key) -> CacheEntry | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.state is not EntryState.READY or entry.doomed:
                return None
            entry.pins += 1
            if entry.stored:  # an upload's smoke test is used once: never protected
                self._order.touch(key)
            self.stats.hits += 1
            return entry

    def _load(self, task: str, version: int, bundle: Bundle | None, wait_s: float) -> CacheEntry:
        t0 = time.perf_counter()
        with self._lock:
            self.stats.misses += 1
        try:
            if bundle is None:
                bundle = self._fetch(task, version)
            with self._lock:
                head = self._spare_heads.pop((task, version), None)
            if head is None:
                head = build_head(bundle.manifest, bundle.tensors).to(device=self.device, dtype=self.dtype).eval()
                head.requires_grad_(False)
            nbytes = self.footprint(bundle.manifest)
            with self._lock:
                slot = self._reserve(nbytes, task, version, wait_s)
                entry = CacheEntry(task, version, slot, nbytes, bundle.manifest, head, pins=1)
                self._entries[entry.key] = entry
                self._order.add(entry.key)
                self.stats.resident_bytes += nbytes
                self.stats.resident_entries += 1
        except BaseException:
            with self._lock:
                self.stats.load_failures += 1
            raise
        try:
            if bundle.manifest.adapter is not None:
                self.pool.write(slot, bundle.manifest.adapter, bundle.tensors)
            elif bundle.manifest.lora is not None:
                pool_bytes = self.pool.lora.bytes_after(bundle.manifest.lora)
                if pool_bytes > self.max_bytes:  # the LoRA pool holds every slot at the widest rank
                    raise BundleInvalid(
                        "over_cache_budget", f"LoRA of rank {bundle.manifest.lora.rank} on "
                        f"{', '.join(bundle.manifest.lora.targets)} would grow the LoRA pool (every slot at that "
                        f"rank) to {pool_bytes} bytes, more than the adapter cache budget ({self.max_bytes} bytes)")
                self.pool.write_lora(slot, bundle.manifest.lora, bundle.tensors)
            else:  # head only: gathered forwards read this slot too, so nothing stale may stay in it
                self.pool.clear(slot)
        except BaseException:
            with self._lock:
                entry.state = EntryState.EVICTED
                self._drop(entry)
                self.stats.load_failures += 1
            raise
        seconds = time.perf_counter() - t0
        with self._lock:
            entry.state = EntryState.READY
            self.stats.load_seconds_total += seconds
        if self._on_load_hook is not None:
            self._on_load_hook(entry, seconds)
        return entry

    def _reserve(self, nbytes: int, task: str, version: int, wait_s: float) -> int:
        """Evict unpinned entries, in eviction order, until `nbytes` and one slot fit; return the slot. While
        every slot (or byte) is pinned, wait for a release, up to `wait_s` seconds. Caller holds the lock."""
        if nbytes > self.max_bytes:
            raise CacheFull(f"{task}@{version} needs {nbytes} bytes on the device, more than the whole cache "
                            f"budget of {self.max_bytes} bytes (ADAPTER_SERVICE_CACHE_MAX_BYTES)")
        deadline, waited_since = 0.0, None
        while True:
            for key in self._order.victims():
                if self._fits(nbytes):
                    break
                entry = self._entries[key]
                if entry.pins == 0 and entry.state is EntryState.READY:
                    self._evict(entry)
            now = time.perf_counter()
            if self._fits(nbytes):
                if waited_since is not None:
                    self.stats.slot_wait_seconds_total += now - waited_since
                return self._free_slots.pop()
            if wait_s <= 0:  # a caller that does not wait (a pre-load): no room now, and no wait to count
                raise CacheFull(f"no free slot for {task}@{version} without waiting")
            if waited_since is None:
                waited_since, deadline = now, now + wait_s
                self.stats.slot_waits += 1
            if now >= deadline:
                self.stats.slot_wait_seconds_total += now - waited_since
                self.stats.slot_wait_timeouts += 1
                raise CacheFull(f"every resident adapter stayed in use by in-flight requests for {wait_s:g} s "
                                f"(no slot for {task}@{version}); retry shortly")
            self._released.wait(deadline - now)

    def _fits(self, nbytes: int) -> bool:
        return bool(self._free_slots) and self.stats.resident_bytes + nbytes <= self.max_bytes

    def _evict(self, entry: CacheEntry) -> None:
        """The eviction callback. Caller holds the lock; the entry is unpinned."""
        entry.state = EntryState.EVICTED
        self._drop(entry)
        if not entry.doomed and entry.stored:
            self._spare_heads[entry.key] = entry.head
            while len(self._spare_heads) > 4 * self.max_slots:
                self._spare_heads.popitem(last=False)
        self.stats.evictions += 1
        if self._on_evict_hook is not None:
            self._on_evict_hook(entry)

    def _drop(self, entry: CacheEntry) -> None:
        if self._entries.get(entry.key) is entry:
            del self._entries[entry.key]
            self._order.remove(entry.key)
        self.pool.forget(entry.slot)
        self._free_slots.append(entry.slot)
        self._free_slots.sort(reverse=True)
        self.stats.resident_bytes -= entry.nbytes
        self.stats.resident_entries -= 1
        self._released.notify_all()
