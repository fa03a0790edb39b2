"""Keep one replica in step with the shared store: follow change events, resync when one may be missed.

    sync = ClusterSync(store, on_task_changed=registry.refresh, on_resync=registry.refresh_all,
                       resync_interval_s=2.0)   # or start_cluster_sync(settings, store, ...), started
    sync.start()          # background thread; returns at once, Redis may be down
    sync.health()         # SyncHealth for /readyz: connected or not, last error, counters
    sync.stop()

Writes need no publishing by the app: `RedisAdapterStore` announces each of its writes once it is
durable, with the generation it produced (a store built with `announce=False` announces nothing: replicas
then learn of its writes by resync only).

What it guarantees, with `on_task_changed(task)` and `on_resync()` supplied by the app:

- every change event on the store's channel (this replica's own writes included) calls
  `on_task_changed(event.task)`, in arrival order;
- after each (re)connection to Redis it calls `on_resync()` once, before any event;
- every `resync_interval_s` it reads `store.generation()`; when that differs from the last generation it
  has seen all writes up to (after a short wait for events still in flight) it calls `on_resync()`, so a
  pub/sub message lost in transit leaves a replica stale for one interval at most;
- when Redis goes away it reconnects with exponential backoff (with jitter) up to `reconnect_max_s`.

Callbacks run on the sync thread, one at a time; they must be idempotent and thread-safe with respect to
the request path. If one raises, the error is logged and the next check resyncs.

A thread rather than an asyncio task: the store is a blocking client the app already calls from worker
threads, the callbacks take the runtime's threading locks, and a thread keeps following events while the
event loop is busy (or absent: the CLI, tests). The module knows nothing of FastAPI or the runtime.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

import redis
from pydantic import ValidationError
from redis.backoff import ExponentialWithJitterBackoff

from service.cluster.connection import connect
from service.cluster.events import ChangeEvent
from service.cluster.redis_store import RedisAdapterStore
from service.errors import StoreUnavailable

if TYPE_CHECKING:
    from service.settings import ServiceSettings

log = logging.getLogger(__name__)

_POLL_S = 0.2  # longest blocking read: bounds how long stop() waits for the thread
_IN_FLIGHT_GRACE_S = 0.05  # how long a generation mismatch waits for events still on the wire


class SyncState(str, Enum):
    STARTING = "starting"  # start() called, first connection not made yet
    CONNECTED = "connected"  # subscribed and resynced
    DISCONNECTED = "disconnected"  # lost Redis (or never reached it); reconnecting with backoff
    STOPPED = "stopped"


@dataclass(frozen=True)
class SyncHealth:
    state: SyncState
    last_error: str | None  # the last Redis or callback failure, kept after recovery
    since: float  # time.time() of the last state change
    generation: int | None  # the generation this replica has seen every write up to
    events: int  # change events handled
    resyncs: int  # on_resync calls that completed

    @property
    def connected(self) -> bool:
        return self.state is SyncState.CONNECTED


class _Disconnected(Exception):
    """Internal: the subscription is gone (Redis error); leave the loop and reconnect."""


class ClusterSync:
    """Follows the store's change events in a background thread; see the module docstring."""

    def __init__(
        self,
        store: RedisAdapterStore,
        *,
        on_task_changed: Callable[[str], object],  # its return value is ignored
        on_resync: Callable[[], None],
        resync_interval_s: float = 2.0,
        reconnect_min_s: float = 0.05,
        reconnect_max_s: float = 5.0,
    ):
        self.store = store
        self.on_task_changed = on_task_changed
        self.on_resync = on_resync
        self.resync_interval_s = resync_interval_s
        self._backoff = ExponentialWithJitterBackoff(cap=reconnect_max_s, base=reconnect_min_s)
        # No retries: the subscription fails loudly instead of reconnecting behind our back (a gap).
        self._sub_client = connect(store.url, timeout_s=store.timeout_s, max_connections=2, retries=0)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._state = SyncState.STOPPED
        self._since = time.time()
        self._last_error: str | None = None
        self._seen: int | None = None  # every write up to this generation has been handled
        self._ahead: set[int] = set()  # generations handled beyond `_seen` (events out of order)
        self._events = 0
        self._resyncs = 0
        self._ready = threading.Event()

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("ClusterSync already started")
        self._set_state(SyncState.STARTING)
        self._thread = threading.Thread(target=self._run, name="cluster-sync", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._sub_client.close()
        self._sub_client.connection_pool.disconnect()
        self._set_state(SyncState.STOPPED)

    def wait_connected(self, timeout: float) -> bool:
        """Block until the first (re)connection and its resync are done; False on timeout."""
        return self._ready.wait(timeout)

    def health(self) -> SyncHealth:
        with self._lock:
            return SyncHealth(self._state, self._last_error, self._since, self._seen, self._events, self._resyncs)

    # --- the thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            pubsub = self._sub_client.pubsub()
            try:
                self._subscribe(pubsub)
                self._resync()  # after the subscription is live, so no write falls between the two
                if failures:
                    log.info("cluster sync reconnected to Redis after %d attempt(s)", failures)
                self._set_state(SyncState.CONNECTED)
                self._ready.set()
                failures = 0
                self._follow(pubsub)
            except (_Disconnected, redis.RedisError, StoreUnavailable) as exc:
                failures += 1
                self._ready.clear()
                self._set_state(SyncState.DISCONNECTED, error=f"Redis: {exc}")
                # one warning per outage; the retries that follow are debug noise
                log.log(logging.WARNING if failures == 1 else logging.DEBUG,
                        "cluster sync lost Redis (%s); reconnecting with backoff", exc)
                self._stop.wait(self._backoff.compute(failures))
            finally:
                pubsub.close()

    def _subscribe(self, pubsub: redis.client.PubSub) -> None:
        """Subscribe and wait for Redis to confirm: from then on every event reaches this replica."""
        pubsub.subscribe(self.store.events_channel)
        reply = pubsub.get_message(timeout=self.store.timeout_s)
        if reply is None or reply.get("type") != "subscribe":
            raise _Disconnected(f"no confirmation of the subscription to {self.store.events_channel}")

    def _follow(self, pubsub: redis.client.PubSub) -> None:
        next_check = time.monotonic() + self.resync_interval_s
        while not self._stop.is_set():
            self._pump(pubsub, min(_POLL_S, max(0.0, next_check - time.monotonic())))
            if time.monotonic() >= next_check:
                self._check_generation(pubsub)
                next_check = time.monotonic() + self.resync_interval_s

    def _pump(self, pubsub: redis.client.PubSub, timeout: float) -> bool:
        """Handle at most one message, waiting up to `timeout`; True if one came."""
        try:
            message = pubsub.get_message(timeout=timeout)
        except redis.RedisError as exc:
            raise _Disconnected(str(exc)) from exc
        if message is None or message.get("type") != "message":
            return False
        try:
            event = ChangeEvent.decode(message["data"])
        except ValidationError:
            log.warning("ignoring a malformed message on %s", self.store.events_channel)
            return True
        try:
            self.on_task_changed(event.task)
        except Exception as exc:  # leave the generation unseen: the next check resyncs
            self._note_error(f"on_task_changed({event.task}) failed: {exc}")
            log.exception("on_task_changed(%s) failed", event.task)
            return True
        with self._lock:
            self._events += 1
            self._mark_seen(event.generation)
        return True

    def _check_generation(self, pubsub: redis.client.PubSub) -> None:
        current = self.store.generation()
        deadline = time.monotonic() + _IN_FLIGHT_GRACE_S
        while self._seen is not None and self._seen < current and time.monotonic() < deadline:
            self._pump(pubsub, max(0.0, deadline - time.monotonic()))  # events may still be on the wire
        if self._seen != current:
            log.info("generation %s, seen up to %s: resync", current, self._seen)
            self._resync()

    def _resync(self) -> None:
        current = self.store.generation()  # read first: writes after it show up at the next check
        try:
            self.on_resync()
        except StoreUnavailable:
            raise
        except Exception as exc:
            self._note_error(f"on_resync failed: {exc}")
            log.exception("on_resync failed")
            return
        with self._lock:
            self._seen = current
            self._ahead = {g for g in self._ahead if g > current}
            self._advance()
            self._resyncs += 1

    def _mark_seen(self, generation: int) -> None:
        """Advance `_seen` over consecutive generations only, so a gap stays visible (lock held)."""
        if self._seen is None or generation <= self._seen:
            return
        self._ahead.add(generation)
        self._advance()

    def _advance(self) -> None:
        while self._seen is not None and self._seen + 1 in self._ahead:
            self._seen += 1
            self._ahead.discard(self._seen)

    def _set_state(self, state: SyncState, error: str | None = None) -> None:
        with self._lock:
            if state is not self._state:
                self._state, self._since = state, time.time()
            if error is not None:
                self._last_error = error

    def _note_error(self, error: str) -> None:
        with self._lock:
            self._last_error = error


def start_cluster_sync(
    settings: ServiceSettings, store: RedisAdapterStore, *, on_task_changed: Callable[[str], object],
    on_resync: Callable[[], None],
) -> ClusterSync:
    """A started ClusterSync configured from settings (what the app factory calls)."""
    sync = ClusterSync(store, on_task_changed=on_task_changed, on_resync=on_resync,
                       resync_interval_s=settings.resync_interval_s, reconnect_max_s=settings.redis_reconnect_max_s)
    sync.start()
    return sync
