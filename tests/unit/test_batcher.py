"""The dynamic batcher's scheduling, on a fake engine (no model): concurrent forwards with several workers,
no waiting when idle, batches that gather while every worker is busy, per-row results in order."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from service.modeling.encoding import EncodedRow
from service.runtime.batcher import Batcher
from service.runtime.engine import RowRequest, RowResult


def row(n: int = 4) -> EncodedRow:
    return EncodedRow(tuple(range(n)), None, ((0, 1),) * n, (0,) * n, (None,) * n, False, "x")


class FakeEngine:
    """Records each batch; each forward takes `seconds` and echoes the row's task."""

    def __init__(self, seconds: float = 0.0):
        self.seconds = seconds
        self.batches: list[list[str]] = []
        self.running = 0
        self.max_running = 0
        self._lock = threading.Lock()

    def run(self, requests):
        with self._lock:
            self.running += 1
            self.max_running = max(self.max_running, self.running)
            self.batches.append([r.task for r in requests])
        time.sleep(self.seconds)
        with self._lock:
            self.running -= 1
        return [RowResult(prediction={"task": r.task}) for r in requests]


async def with_batcher(engine, coro, **kw):
    batcher = Batcher(engine, **kw)
    await batcher.start()
    try:
        return await coro(batcher)
    finally:
        await batcher.stop()


def test_two_workers_run_two_batches_at_once():
    engine = FakeEngine(seconds=0.2)

    async def go(b):
        return await asyncio.gather(*(b.submit([RowRequest(f"t{i}", 1, row())]) for i in range(2)))

    results = asyncio.run(with_batcher(engine, go, workers=2, max_batch_size=1, max_wait_ms=0))
    assert [r[0].prediction for r in results] == [{"task": "t0"}, {"task": "t1"}]
    assert engine.max_running == 2


def test_one_worker_never_overlaps_forwards():
    engine = FakeEngine(seconds=0.05)

    async def go(b):
        return await asyncio.gather(*(b.submit([RowRequest(f"t{i}", 1, row())]) for i in range(4)))

    asyncio.run(with_batcher(engine, go, workers=1, max_batch_size=1, max_wait_ms=0))
    assert engine.max_running == 1 and len(engine.batches) == 4


def test_an_idle_batcher_does_not_wait_for_company():
    engine = FakeEngine()

    async def go(b):
        t0 = time.perf_counter()
        await b.submit([RowRequest("a", 1, row())])
        return time.perf_counter() - t0

    elapsed = asyncio.run(with_batcher(engine, go, workers=1, max_wait_ms=2000))
    assert elapsed < 1.0  # max_wait is 2 s: an idle batcher ran the row at once


def test_rows_gather_while_every_worker_is_busy():
    engine = FakeEngine(seconds=0.3)

    async def go(b):
        first = asyncio.create_task(b.submit([RowRequest("a", 1, row())]))
        await asyncio.sleep(0.05)  # the first batch is running now
        rest = [asyncio.create_task(b.submit([RowRequest(f"t{i}", 1, row())])) for i in range(5)]
        return await asyncio.gather(first, *rest)

    results = asyncio.run(with_batcher(engine, go, workers=1, max_batch_size=32, max_wait_ms=50))
    assert [r[0].prediction["task"] for r in results] == ["a", "t0", "t1", "t2", "t3", "t4"]
    assert engine.batches == [["a"], ["t0", "t1", "t2", "t3", "t4"]]


@pytest.mark.parametrize(("workers", "sizes"), [(1, [32]), (2, [16, 16]), (3, [11, 11, 10]), (4, [8, 8, 8, 8])])
def test_idle_workers_split_the_waiting_rows(workers, sizes):
    engine = FakeEngine(seconds=0.1)

    async def go(b):
        return await b.submit([RowRequest(f"t{i}", 1, row()) for i in range(32)])

    results = asyncio.run(with_batcher(engine, go, workers=workers, max_batch_size=32, max_wait_ms=0))
    assert [r.prediction["task"] for r in results] == [f"t{i}" for i in range(32)]
    assert [len(b) for b in engine.batches] == sizes
    assert engine.max_running == workers


def test_a_worker_beside_a_small_running_batch_leaves_it_a_share():
    engine = FakeEngine(seconds=0.3)

    async def go(b):
        first = asyncio.create_task(b.submit([RowRequest("a", 1, row())]))
        await asyncio.sleep(0.05)  # one worker runs 1 row; 6 more come: 7 rows in the service, 4 per worker
        rest = asyncio.create_task(b.submit([RowRequest(f"t{i}", 1, row()) for i in range(6)]))
        return await asyncio.gather(first, rest)

    first, rest = asyncio.run(with_batcher(engine, go, workers=2, max_batch_size=32, max_wait_ms=0))
    assert [r.prediction["task"] for r in first + rest] == ["a"] + [f"t{i}" for i in range(6)]
    assert engine.batches == [["a"], ["t0", "t1", "t2", "t3"], ["t4", "t5"]]


def test_a_single_worker_takes_every_waiting_row():
    engine = FakeEngine(seconds=0.2)

    async def go(b):
        first = asyncio.create_task(b.submit([RowRequest("a", 1, row())]))
        await asyncio.sleep(0.05)
        return await asyncio.gather(first, b.submit([RowRequest(f"t{i}", 1, row()) for i in range(6)]))

    asyncio.run(with_batcher(engine, go, workers=1, max_batch_size=32, max_wait_ms=0))
    assert [len(b) for b in engine.batches] == [1, 6]


@pytest.mark.parametrize("workers", [1, 2])
def test_stop_fails_waiting_rows_and_finishes_running_ones(workers):
    engine = FakeEngine(seconds=0.2)

    async def go():
        b = Batcher(engine, workers=workers, max_batch_size=1, max_wait_ms=0)
        await b.start()
        tasks = [asyncio.create_task(b.submit([RowRequest(f"t{i}", 1, row())])) for i in range(workers + 2)]
        await asyncio.sleep(0.05)
        await b.stop()
        return await asyncio.gather(*tasks, return_exceptions=True)

    outcomes = asyncio.run(go())
    done = [o for o in outcomes if isinstance(o, list)]
    assert len(done) == workers  # the running batches finished
    assert all(type(o).__name__ == "NotReady" for o in outcomes if not isinstance(o, list))
