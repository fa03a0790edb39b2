"""Cross-task dynamic batching: rows of ANY task wait in one queue and share backbone forwards.

A batch closes when it has `max_batch_size` rows, when its tokens would exceed `max_batch_tokens` (real
tokens for an engine that packs its forwards, rows x longest row for a padded one),
or when its oldest row has waited `max_wait_ms` (no wait when no other batch is running: nothing is
gained by holding the only work back). Rows of similar length go together (less padding), and
every batch includes the oldest waiting row (no starvation). With a `CacheBudget`, a batch admits only
rows whose tasks fit the device cache beside the tasks the running batches hold (`admit_rows`); the others
stay queued in arrival order, and when the oldest row's task does not fit, no batch starts until a running
one finishes, so a small cache makes requests wait, never fail, and a rare task is not starved. Forwards
run in `workers` threads (a batch is taken when a worker is free, so rows keep gathering while all are
busy; a batch takes at most a fair share of the rows waiting and running, so the workers' batches stay
level), and the event loop keeps accepting and tokenising requests meanwhile. The queue is bounded: a full
queue refuses new work with `Overloaded` instead of letting latency grow without limit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from service.errors import NotReady, Overloaded
from service.modeling.batch_plan import admit_rows, pack_batches
from service.runtime.engine import Engine, RowRequest, RowResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchStats:
    """What one forward did (for metrics)."""

    rows: int
    tokens: int  # what the forward computed on: real tokens (packed) or rows x longest row (padded)
    tasks: int
    seconds: float
    cut_short: bool = False  # rows of other tasks were kept out because the cache could not hold them too
    admission_waits: tuple[float, ...] = ()  # seconds each row of it waited after first being kept out


@dataclass(frozen=True)
class CacheBudget:
    """What the device cache holds at most: distinct task versions (slots) and their bytes."""

    slots: int
    max_bytes: int


@dataclass(eq=False)
class _Pending:
    request: RowRequest
    future: asyncio.Future[RowResult]
    enqueued: float  # loop time
    kept_out: float | None = None  # loop time it was first kept out of a batch by the cache budget


class Batcher:
    def __init__(
        self,
        engine: Engine,
        *,
        max_batch_size: int = 32,
        max_batch_tokens: int = 8192,
        packed: bool = False,
        max_wait_ms: float = 5.0,
        queue_limit: int = 2048,
        workers: int = 1,
        budget: CacheBudget | None = None,
        on_batch: Callable[[BatchStats], None] | None = None,
    ):
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.packed = packed  # the token budget counts real tokens (the engine computes on no padding)
        self.max_wait = max_wait_ms / 1000.0
        self.queue_limit = queue_limit
        self._on_batch = on_batch
        self._queue: deque[_Pending] = deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._runs: set[asyncio.Task[None]] = set()
        self.workers = workers
        self._free_workers: asyncio.Semaphore | None = None
        self._running_rows = 0  # rows in the batches the workers are running (event-loop side)
        self.budget = budget
        self._held: Counter[tuple[str, int]] = Counter()  # task versions of the running batches -> batches
        self._held_bytes: dict[tuple[str, int], int] = {}
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="forward")
        self._window = 4 * max_batch_size  # rows considered when grouping by length

    @property
    def depth(self) -> int:
        """Rows waiting for a forward."""
        return len(self._queue)

    @property
    def waiting_for_slot(self) -> int:
        """Queued rows that the cache budget has kept out of a batch at least once."""
        return sum(1 for p in self._queue if p.kept_out is not None)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._free_workers = asyncio.Semaphore(self.workers)
        self._task = asyncio.create_task(self._loop(), name="batcher")

    async def stop(self) -> None:
        """Finish nothing new: fail waiting rows with NotReady, stop the loop, release the worker."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._runs:
            await asyncio.gather(*self._runs, return_exceptions=True)
        while self._queue:
            p = self._queue.popleft()
            if not p.future.done():
                p.future.set_exception(NotReady("the service is shutting down"))
        self._executor.shutdown(wait=True)

    async def submit(self, requests: Sequence[RowRequest]) -> list[RowResult]:
        """Queue rows and wait for their results (one per row, in order)."""
        if not self.running:
            raise NotReady("the service is not ready")
        if len(self._queue) + len(requests) > self.queue_limit:
            raise Overloaded(f"request queue is full ({self.queue_limit} rows waiting); retry shortly", retry_after=1.0)
        loop = asyncio.get_running_loop()
        now = loop.time()
        pending = [_Pending(r, loop.create_future(), now) for r in requests]
        self._queue.extend(pending)
        assert self._wakeup is not None  # set by start(), and the batcher is running
        self._wakeup.set()
        return list(await asyncio.gather(*(p.future for p in pending)))

    # --- the loop --------------------------------------------------------------------------------

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            assert self._free_workers is not None and self._wakeup is not None  # set by start()
            await self._free_workers.acquire()  # released when the batch taken below has run
            while not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            # Wait for company only while another batch is running: an idle service answers at once, a
            # busy one lets rows gather (they would wait for a worker anyway).
            deadline = self._queue[0].enqueued + self.max_wait if self._running_rows else loop.time()
            while not self._full() and (remaining := deadline - loop.time()) > 0:
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except TimeoutError:
                    break
            # A fair share of the rows in the service (waiting + running), so the workers' batches stay
            # level: a burst of 32 rows on 2 idle CPU workers runs as 16 + 16 at once, not 32 on one core
            # while the other has nothing; a worker next to a small running batch leaves it some rows.
            share = -(-(len(self._queue) + self._running_rows) // self.workers)
            batch, cut_short = self._take(share, loop.time())
            if not batch:
                self._free_workers.release()
                if cut_short:  # the oldest row's task does not fit: wait for a running batch to finish
                    self._wakeup.clear()
                    await self._wakeup.wait()
                continue
            self._running_rows += len(batch)
            held = {k: p.request.footprint for p in batch if (k := p.request.key) is not None}  # its task versions
            for key, nbytes in held.items():
                self._held[key] += 1
                self._held_bytes[key] = nbytes
            run = asyncio.create_task(self._run(loop, batch, held, cut_short))
            self._runs.add(run)
            run.add_done_callback(self._runs.discard)

    def _full(self) -> bool:
        if len(self._queue) >= self.max_batch_size:
            return True
        return self._tokens([len(p.request.row) for p in self._queue]) >= self.max_batch_tokens

    def _tokens(self, lengths: list[int]) -> int:
        return sum(lengths) if self.packed else max(lengths) * len(lengths)

    def _take(self, limit: int, now: float) -> tuple[list[_Pending], bool]:
        """Remove and return the next batch (at most `limit` rows, and `max_batch_size`): the oldest row plus
        rows of similar length from the window whose tasks fit the cache budget; and whether the budget kept
        rows out. An empty batch with rows still queued means the oldest row's task does not fit yet."""
        while self._queue and self._queue[0].future.done():  # cancelled by a disconnected client
            self._queue.popleft()
        window = [p for p in list(self._queue)[: self._window] if not p.future.done()]
        if not window:  # the window held only cancelled rows
            self._queue = deque(p for p in self._queue if not p.future.done())
            return [], False
        candidates, refused = window, []
        if self.budget is not None:
            held = {k: self._held_bytes[k] for k in self._held}
            admission = admit_rows([p.request.key for p in window], [p.request.footprint for p in window], held,
                                   slots=self.budget.slots, max_bytes=self.budget.max_bytes)
            candidates = [window[i] for i in admission.rows]
            refused = [window[i] for i in admission.refused]
            for p in refused:
                if p.kept_out is None:
                    p.kept_out = now
            if not candidates:
                return [], True
        groups = pack_batches([len(p.request.row) for p in candidates], min(self.max_batch_size, limit),
                              self.max_batch_tokens, padded=not self.packed)
        chosen = [candidates[i] for i in groups[0]]  # groups[0] holds candidates[0], the oldest row
        taken = set(map(id, chosen))
        self._queue = deque(p for p in self._queue if id(p) not in taken and not p.future.done())
        return chosen, bool(refused)

    async def _run(self, loop: asyncio.AbstractEventLoop, batch: list[_Pending], held: dict[tuple[str, int], int],
                   cut_short: bool) -> None:
        t0, started = time.perf_counter(), loop.time()
        assert self._free_workers is not None and self._wakeup is not None  # set by start()
        try:
            results = await loop.run_in_executor(self._executor, self.engine.run, [p.request for p in batch])
        except Exception as exc:  # a bug in the engine: fail this batch, keep serving
            log.exception("batch of %d rows failed", len(batch))
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
            return
        finally:
            self._running_rows -= len(batch)
            for key in held:
                self._held[key] -= 1
                if not self._held[key]:
                    del self._held[key], self._held_bytes[key]
            self._free_workers.release()
            self._wakeup.set()  # rows kept out by the cache budget may fit now
        for p, r in zip(batch, results):
            if not p.future.done():
                p.future.set_result(r)
        if self._on_batch is not None:
            tokens = self._tokens([len(p.request.row) for p in batch])
            tasks = len({(p.request.task, p.request.version) for p in batch})
            waits = tuple(started - p.kept_out for p in batch if p.kept_out is not None)
            self._on_batch(BatchStats(len(batch), tokens, tasks, time.perf_counter() - t0,
                                      cut_short, waits))
