"""Device cache: byte and slot budgets, segmented-LRU eviction, pins under concurrency, single-flight loads."""

from __future__ import annotations

import math
import random
import threading
import time

import pytest
import torch

from service.bundles.codec import decode_bundle
from service.bundles.manifest import AdapterConfig
from service.errors import CacheFull
from service.modeling.slot_pool import install_slot_pool
from service.runtime.cache import AdapterCache, EntryState, footprint
from tests.conftest import make_bundle, make_manifest

TASKS = [f"t{i}" for i in range(8)]


class Fetcher:
    """Decodes pre-built bundles; counts calls per key; optionally slow (to widen race windows)."""

    def __init__(self, ref, delay: float = 0.0):
        self.data = {
            (t, v): make_bundle(make_manifest(ref, task=t, adapter=AdapterConfig(bottleneck=8)), seed=10 * i + v)
            for i, t in enumerate(TASKS) for v in (1, 2)
        }
        self.ref, self.delay = ref, delay
        self.calls: dict[tuple[str, int], int] = {}
        self.lock = threading.Lock()

    def __call__(self, task: str, version: int):
        with self.lock:
            self.calls[(task, version)] = self.calls.get((task, version), 0) + 1
        if self.delay:
            time.sleep(self.delay)
        return decode_bundle(self.data[(task, version)], backbone=self.ref, max_bytes=1 << 30)


def make_cache(backbone, fetch, *, entries_that_fit: int, slots: int = 8, on_evict=None,
               wait_s: float = 0.0) -> AdapterCache:
    pool = install_slot_pool(backbone.model, backbone.spec, slots, device=torch.device("cpu"), dtype=torch.float32)
    probe = AdapterCache(pool, fetch, max_bytes=1 << 30, max_slots=slots, device=pool.device, dtype=pool.dtype)
    one = probe.acquire(TASKS[0], 1)
    size = one.nbytes
    probe.release(one)
    probe.invalidate(TASKS[0])
    fetch.calls.clear()
    return AdapterCache(pool, fetch, max_bytes=size * entries_that_fit, max_slots=slots,
                        device=pool.device, dtype=pool.dtype, on_evict=on_evict, admission_timeout_s=wait_s)


def slot_holds(cache: AdapterCache, entry, fetch: Fetcher) -> bool:
    """The pool slot still holds exactly this entry's adapter weights."""
    tensors = decode_bundle(fetch.data[entry.key], backbone=fetch.ref, max_bytes=1 << 30).tensors
    p = cache.pool.point_index(1, "ffn")
    return torch.equal(cache.pool.down_w[p, entry.slot, :, :8], tensors["adapter.1.ffn.down.weight"])


def test_lru_eviction_respects_the_byte_budget(tiny_backbone):
    fetch = Fetcher(tiny_backbone.ref)
    evicted = []
    cache = make_cache(tiny_backbone, fetch, entries_that_fit=3, on_evict=lambda e: evicted.append(e.key))
    for t in TASKS[:3]:
        cache.release(cache.acquire(t, 1))
    cache.release(cache.acquire("t0", 1))  # t0 becomes most recently used
    cache.release(cache.acquire("t3", 1))  # evicts the least recently used: t1
    assert evicted == [("t1", 1)]
    assert {e.task for e in cache.resident()} == {"t0", "t2", "t3"}
    assert cache.stats.resident_bytes <= cache.max_bytes
    assert cache.stats.hits == 1 and cache.stats.misses == 4 and cache.stats.evictions == 1
    assert cache.stats.load_seconds_total > 0



def test_tasks_used_once_do_not_push_out_tasks_used_again(tiny_backbone):
    """Four tasks used twice each, then four one-off tasks through a cache of five slots: the one-off tasks
    only evict each other (a plain LRU would have evicted three of the four), so the four come back as hits."""
    fetch = Fetcher(tiny_backbone.ref)
    cache = make_cache(tiny_backbone, fetch, entries_that_fit=100, slots=5)
    for _ in range(2):
        for t in TASKS[:4]:
            cache.release(cache.acquire(t, 1))
    for t in TASKS[4:]:
        cache.release(cache.acquire(t, 1))
    assert {e.task for e in cache.resident()} == {*TASKS[:4], TASKS[7]}
    for t in TASKS[:4]:
        cache.release(cache.acquire(t, 1))
    assert all(fetch.calls[(t, 1)] == 1 for t in TASKS)  # each fetched once: no reload
    assert cache.stats.misses == 8 and cache.stats.evictions == 3 and cache.stats.hits == 8


def test_an_uploads_smoke_test_is_never_protected(tiny_backbone):
    """A smoke test (negative version) is acquired again by its forward; it stays on probation, so it never
    pushes a task in use out of the protected segment."""
    fetch = Fetcher(tiny_backbone.ref)
    cache = make_cache(tiny_backbone, fetch, entries_that_fit=100, slots=5)
    for _ in range(2):
        cache.release(cache.acquire("t0", 1))
    bundle = decode_bundle(fetch.data[("t1", 1)], backbone=fetch.ref, max_bytes=1 << 30)
    for _ in range(2):
        cache.release(cache.acquire("t1", -1, bundle))
    assert cache._order.segments() == ([("t1", -1)], [("t0", 1)])

def test_slot_budget_is_respected(tiny_backbone):
    fetch = Fetcher(tiny_backbone.ref)
    cache = make_cache(tiny_backbone, fetch, entries_that_fit=100, slots=2)
    for t in TASKS[:5]:
        cache.release(cache.acquire(t, 1))
        assert len(cache.resident()) <= 2
    assert cache.stats.evictions == 3


def test_pinned_entries_are_never_evicted_and_full_cache_says_so(tiny_backbone):
    fetch = Fetcher(tiny_backbone.ref)
    cache = make_cache(tiny_backbone, fetch, entries_that_fit=2)
    a, b = cache.acquire("t0", 1), cache.acquire("t1", 1)
    with pytest.raises(CacheFull):
        cache.acquire("t2", 1)
    assert a.state is EntryState.READY and b.state is EntryState.READY
    cache.release(b)
    c = cache.acquire("t2", 1)  # now t1 (unpinned) can go
    assert b.state is EntryState.EVICTED and a.state is EntryState.READY
    assert slot_holds(cache, a, fetch) and slot_holds(cache, c, fetch)
    cache.release(a)
    cache.release(c)


def test_a_load_that_finds_every_slot_pinned_waits_for_a_release(tiny_backbone):
    fetch = Fetcher(tiny_backbone.ref)
    cache = make_cache(tiny_backbone, fetch, entries_that_fit=100, slots=2, wait_s=10.0)
    a, b = cache.acquire("t0", 1), cache.acquire("t1", 1)
    got: list = []
    waiter = threading.Thread(target=lambda: got.append(cache.acquire("t2", 1)))
    waiter.start()
    time.sleep(0.2)
    assert got == [] and waiter.is_alive()  # still waiting: both slots are pinned
    cache.release(b)
    waiter.join(5.0)
    assert [e.key for e in got] == [("t2", 1)] and got[0].state is EntryState.READY
    assert b.state is EntryState.EVICTED and a.state is EntryState.READY
    assert cache.stats.slot_waits == 1 and cache.stats.slot_wait_seconds_total >= 0.15
    assert cache.stats.slot_wait_timeouts == 0
    cache.release(a)
    cache.release(got[0])


def test_a_slot_wait_is_bounded_and_then_says_why(tiny_backbone):
    fetch = Fetcher(tiny_backbone.ref)
    cache = make_cache(tiny_backbone, fetch, entries_that_fit=100, slots=1, wait_s=0.1)
    a = cache.acquire("t0", 1)
    t0 = time.perf_counter()
    with pytest.raises(CacheFull, match=r"in use by in-flight requests for 0.1 s \(no slot for t1@1\)"):
        cache.acquire("t1", 1)
    assert 0.09 <= time.perf_counter() - t0 < 2.0
    assert cache.stats.slot_wait_timeouts == 1 and cache._key_locks == {}
    with pytest.raises(CacheFull):  # a caller may refuse to wait at all (pre-loads)
        cache.acquire("t1", 1, wait_s=0.0)
    cache.release(a)
    cache.release(cache.acquire("t1", 1))


def test_an_adapter_larger_than_the_whole_budget_fails_at_once(tiny_backbone):
    fetch = Fetcher(tiny_backbone.ref)
    cache = make_cache(tiny_backbone, fetch, entries_that_fit=1, wait_s=10.0)
    big = make_manifest(tiny_backbone.ref, task="big", adapter=AdapterConfig(bottleneck=64))
    fetch.data[("big", 1)] = make_bundle(big)
    t0 = time.perf_counter()
    with pytest.raises(CacheFull, match="more than the whole cache budget"):
        cache.acquire("big", 1)
    assert time.perf_counter() - t0 < 2.0
    assert cache.footprint(big) > cache.max_bytes


def test_footprint_is_what_a_loaded_entry_takes(tiny_backbone):
    fetch = Fetcher(tiny_backbone.ref)
    cache = make_cache(tiny_backbone, fetch, entries_that_fit=10)
    entry = cache.acquire("t3", 2)
    manifest = decode_bundle(fetch.data[("t3", 2)], backbone=fetch.ref, max_bytes=1 << 30).manifest
    assert entry.nbytes == cache.footprint(manifest) == cache.stats.resident_bytes
    cache.release(entry)


def test_versions_are_separate_entries(tiny_backbone):
    fetch = Fetcher(tiny_backbone.ref)
    cache = make_cache(tiny_backbone, fetch, entries_that_fit=4)
    v1, v2 = cache.acquire("t0", 1), cache.acquire("t0", 2)
    assert v1.slot != v2.slot
    assert slot_holds(cache, v1, fetch) and slot_holds(cache, v2, fetch)
    cache.release(v1)
    cache.release(v2)


def test_invalidate_drops_unpinned_now_and_pinned_on_release(tiny_backbone):
    fetch = Fetcher(tiny_backbone.ref)
    cache = make_cache(tiny_backbone, fetch, entries_that_fit=4)
    pinned = cache.acquire("t0", 1)
    cache.release(cache.acquire("t0", 2))
    assert cache.invalidate("t0") == 2
    assert not cache.is_resident("t0", 2)
    assert pinned.state is EntryState.READY  # still serving its in-flight batch
    cache.release(pinned)
    assert pinned.state is EntryState.EVICTED
    assert cache.stats.resident_entries == 0 and cache.stats.resident_bytes == 0


def test_one_load_per_key_under_concurrent_misses(tiny_backbone):
    fetch = Fetcher(tiny_backbone.ref, delay=0.05)
    cache = make_cache(tiny_backbone, fetch, entries_that_fit=4)
    got = []

    def worker():
        e = cache.acquire("t5", 1)
        got.append(e)
        cache.release(e)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert fetch.calls[("t5", 1)] == 1
    assert len({id(e) for e in got}) == 1


def test_concurrent_use_never_exceeds_budget_nor_evicts_a_pinned_entry(tiny_backbone):
    fetch = Fetcher(tiny_backbone.ref, delay=0.002)
    violations: list[str] = []
    cache_ref: list[AdapterCache] = []

    def on_evict(entry):
        if entry.pins:
            violations.append(f"evicted pinned {entry.key}")
        if cache_ref and cache_ref[0].stats.resident_bytes > cache_ref[0].max_bytes:
            violations.append("over budget")

    cache = make_cache(tiny_backbone, fetch, entries_that_fit=3, slots=4, on_evict=on_evict)
    cache_ref.append(cache)
    stop = time.monotonic() + 3.0
    full = [0]

    def worker(seed: int):
        rng = random.Random(seed)
        while time.monotonic() < stop:
            key = (rng.choice(TASKS), rng.choice((1, 2)))
            try:
                entry = cache.acquire(*key)
            except CacheFull:
                full[0] += 1
                continue
            try:
                if entry.state is not EntryState.READY or entry.key != key:
                    violations.append(f"bad entry {entry.key} {entry.state}")
                time.sleep(rng.random() * 0.003)
                if not slot_holds(cache, entry, fetch):  # nobody overwrote our slot while we held it
                    violations.append(f"slot of pinned {key} overwritten")
                if cache.stats.resident_bytes > cache.max_bytes:
                    violations.append("over budget")
            finally:
                cache.release(entry)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert violations == []
    assert cache.stats.evictions > 10  # the budget was really under pressure
    assert all(e.pins == 0 for e in cache.resident())
    assert cache.stats.resident_bytes <= cache.max_bytes
    assert len(cache.resident()) <= 3


def test_a_reload_after_eviction_reuses_the_head_and_rewrites_the_slot(tiny_backbone):
    fetch = Fetcher(tiny_backbone.ref)
    cache = make_cache(tiny_backbone, fetch, entries_that_fit=100, slots=1)
    first = cache.acquire("t0", 1)
    head = first.head
    cache.release(first)
    cache.release(cache.acquire("t1", 1))  # evicts t0 (one slot)
    again = cache.acquire("t0", 1)
    assert again is not first and again.head is head  # the evicted entry's head, kept for the reload
    assert slot_holds(cache, again, fetch)  # the slot holds t0's weights again
    cache.release(again)
    cache.invalidate("t0")  # a replaced or deleted task: its spare head goes too
    cache.release(cache.acquire("t1", 1))
    assert cache.acquire("t0", 1).head is not head


def test_footprint_is_computed_once_per_manifest_and_never_mixed_up(tiny_backbone):
    """Admission asks for a footprint with every request: the element count is cached on each manifest
    object, each object gets its own (different shapes, different bytes), and a copy with other fields is
    computed afresh."""
    from service.bundles.layout import expected_shapes

    cache = make_cache(tiny_backbone, Fetcher(tiny_backbone.ref), entries_that_fit=2)
    small = make_manifest(tiny_backbone.ref, task="a", adapter=AdapterConfig(bottleneck=8))
    large = make_manifest(tiny_backbone.ref, task="b", adapter=AdapterConfig(bottleneck=32))

    def counted(m):
        return 4 * sum(math.prod(s) for s in expected_shapes(m).values())  # float32

    for _ in range(2):
        assert cache.footprint(small) == counted(small)
        assert cache.footprint(large) == counted(large) > cache.footprint(small)
    again = make_manifest(tiny_backbone.ref, task="a", adapter=AdapterConfig(bottleneck=16))
    assert cache.footprint(again) == counted(again) != cache.footprint(small)
    copied = small.model_copy(update={"adapter": AdapterConfig(bottleneck=32)})
    assert cache.footprint(copied) == counted(copied) == cache.footprint(large)
    assert footprint(small, torch.bfloat16) * 2 == cache.footprint(small)
