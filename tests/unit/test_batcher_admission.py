"""Cache-aware batch formation: batches hold only tasks that fit the device cache beside the running ones,
so a small cache makes rows wait, never fail; the oldest row's task goes first (no starvation)."""

from __future__ import annotations

import asyncio
import random
import threading
import time

import pytest

from service.errors import CacheFull
from service.runtime.batcher import BatchStats, CacheBudget
from service.runtime.engine import Engine, RowRequest, RowResult
from tests.conftest import make_bundle, make_manifest
from tests.unit.test_batcher import row, with_batcher


class SlotCountingEngine:
    """A fake engine with a device cache of `slots` task versions: a batch whose tasks do not fit beside those
    of the batches running now fails its extra rows with CacheFull, as the real cache did without waiting."""

    def __init__(self, slots: int, seconds: float = 0.01):
        self.slots, self.seconds = slots, seconds
        self.pinned: dict[tuple[str, int], int] = {}
        self.batches: list[list[str | None]] = []
        self.most_pinned = 0
        self._lock = threading.Lock()

    def run(self, requests):
        keys = {r.key for r in requests} - {None}
        with self._lock:
            self.batches.append([r.task for r in requests])
            new = [k for k in keys if k not in self.pinned]
            fits = len(self.pinned) + len(new) <= self.slots
            if fits:
                for k in keys:
                    self.pinned[k] = self.pinned.get(k, 0) + 1
                self.most_pinned = max(self.most_pinned, len(self.pinned))
        if not fits:
            return [RowResult(error=CacheFull("every resident adapter is in use")) for _ in requests]
        time.sleep(self.seconds)
        with self._lock:
            for k in keys:
                self.pinned[k] -= 1
                if not self.pinned[k]:
                    del self.pinned[k]
        return [RowResult(prediction={"task": r.task}) for r in requests]


def req(task: str | None, footprint: int = 100) -> RowRequest:
    return RowRequest(task, 1 if task else 0, row(), footprint if task else 0)


def test_four_slots_and_twelve_tasks_in_flight_complete_every_request():
    engine = SlotCountingEngine(slots=4, seconds=0.005)
    stats: list[BatchStats] = []
    tasks = [f"t{i}" for i in range(12)]
    rng = random.Random(0)

    async def client(b, n):
        out = []
        for _ in range(n):
            task = rng.choice(tasks)
            (res,) = await b.submit([req(task)])
            assert res.error is None, res.error
            out.append((task, res.prediction["task"]))
        return out

    async def go(b):
        return await asyncio.gather(*(client(b, 25) for _ in range(16)))

    results = asyncio.run(with_batcher(engine, go, workers=2, max_batch_size=16, max_wait_ms=1,
                                      budget=CacheBudget(slots=4, max_bytes=10_000), on_batch=stats.append))
    pairs = [p for r in results for p in r]
    assert len(pairs) == 400 and all(sent == got for sent, got in pairs)
    assert engine.most_pinned <= 4
    assert all(len({t for t in b if t}) <= 4 for b in engine.batches)
    assert any(s.cut_short for s in stats)  # the budget really bound
    assert any(s.admission_waits for s in stats)


def test_without_a_budget_the_same_traffic_fails_requests():
    """The check above can fail: the same small cache without admission loses rows (the bug it fixes)."""
    engine = SlotCountingEngine(slots=4, seconds=0.005)

    async def go(b):
        rows = [req(f"t{i % 12}") for i in range(48)]
        return await b.submit(rows)

    results = asyncio.run(with_batcher(engine, go, workers=2, max_batch_size=16, max_wait_ms=0))
    assert any(isinstance(r.error, CacheFull) for r in results)


def test_the_byte_budget_binds_like_the_slots():
    engine = SlotCountingEngine(slots=100, seconds=0.005)
    seen: list[BatchStats] = []

    async def go(b):
        return await b.submit([req(f"t{i % 6}", footprint=300) for i in range(36)])

    results = asyncio.run(with_batcher(engine, go, workers=2, max_batch_size=32, max_wait_ms=0,
                                      budget=CacheBudget(slots=100, max_bytes=1000), on_batch=seen.append))
    assert all(r.error is None for r in results)
    assert engine.most_pinned <= 3  # 3 x 300 bytes fit in 1000
    assert max(s.tasks for s in seen) <= 3


def test_a_rare_task_behind_a_hot_flood_is_served_within_a_few_batches():
    engine = SlotCountingEngine(slots=1, seconds=0.01)
    served_after: list[int] = []

    async def flood(b, stop):
        while not stop.is_set():
            await asyncio.gather(*(b.submit([req("hot")]) for _ in range(8)))

    async def go(b):
        stop = asyncio.Event()
        floods = [asyncio.create_task(flood(b, stop)) for _ in range(4)]
        await asyncio.sleep(0.1)  # the hot task fills every batch
        before = len(engine.batches)
        (res,) = await b.submit([req("rare")])
        served_after.append(len(engine.batches) - before)
        stop.set()
        await asyncio.gather(*floods)
        return res

    res = asyncio.run(with_batcher(engine, go, workers=2, max_batch_size=8, max_wait_ms=1,
                                  budget=CacheBudget(slots=1, max_bytes=10_000)))
    assert res.error is None and res.prediction == {"task": "rare"}
    # The rows queued before it, then its own batch once the running hot batches are out (2 workers).
    assert served_after[0] <= 6, served_after
    assert engine.most_pinned == 1


def test_embeddings_need_no_slot():
    engine = SlotCountingEngine(slots=1, seconds=0.005)

    async def go(b):
        return await b.submit([req("a"), req(None), req("b"), req(None)])

    results = asyncio.run(with_batcher(engine, go, workers=1, max_batch_size=8, max_wait_ms=0,
                                      budget=CacheBudget(slots=1, max_bytes=10_000)))
    assert all(r.error is None for r in results)
    assert engine.batches[0] == ["a", None, None] and engine.batches[1] == ["b"]


def test_the_real_engine_with_four_slots_serves_twelve_tasks(tiny_backbone, store):
    """The same through the real engine and cache (tiny BERT): every row answered, none from a wrong task."""
    for i in range(12):
        store.put(f"t{i}", make_bundle(make_manifest(tiny_backbone.ref, task=f"t{i}"), seed=i))
    engine = Engine(tiny_backbone, store, cache_max_slots=4, cache_wait_s=5.0)
    manifest = store.get_info("t0", 1).manifest
    rows = engine.encode(manifest, ["a short one", "a much longer sentence than the first one, with more words"])
    alone = {(t, j): engine.run(engine.requests(t, 1, manifest, [r]))[0].prediction["scores"]
             for t in (f"t{i}" for i in range(12)) for j, r in enumerate(rows)}
    rng = random.Random(1)

    async def client(b):
        for _ in range(12):
            t, j = f"t{rng.randrange(12)}", rng.randrange(2)
            (res,) = await b.submit(engine.requests(t, 1, manifest, [rows[j]]))
            assert res.error is None, res.error
            assert res.prediction["scores"] == pytest.approx(alone[(t, j)], abs=1e-5)

    async def go(b):
        await asyncio.gather(*(client(b) for _ in range(12)))

    asyncio.run(with_batcher(engine, go, workers=2, max_batch_size=8, max_wait_ms=1,
                            budget=CacheBudget(engine.cache.max_slots, engine.cache.max_bytes)))
    assert engine.cache.stats.slot_wait_timeouts == 0 and engine.cache.stats.load_failures == 0
    assert engine.cache.stats.evictions > 0  # 12 tasks through 4 slots

