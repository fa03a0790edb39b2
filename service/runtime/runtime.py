"""The runtime: everything that serves, assembled from settings and started and stopped as one.

`Runtime(settings)` owns the backbone, the store (local folder; Redis when `redis_url` is set; Redis plus a
bucket for the bytes when `s3_endpoint` is set too), the
engine (with its slot pool and cache), the task registry, the batcher, the adapter manager and, with Redis,
the cluster sync whose events refresh the registry. `create_app` builds HTTP routes around a runtime; the
process-wide setup (logging, torch threads, the host allocator) is done by `adapter-service serve`, the
command that starts the process, never here.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from enum import Enum
from typing import TYPE_CHECKING, TypeVar

import torch

from service.bundles.store import AdapterStore, LocalAdapterStore
from service.errors import CacheFull, ConfigurationError, NotReady, StoreUnavailable
from service.host_memory import release_freed_memory
from service.modeling.backbone import Backbone, load_backbone
from service.runtime.adapters import AdapterManager
from service.runtime.batcher import Batcher, BatchStats, CacheBudget
from service.runtime.cache import CacheEntry
from service.runtime.engine import Engine
from service.runtime.registry import TaskRegistry, TaskView
from service.settings import ServiceSettings

if TYPE_CHECKING:
    from service.cluster.sync import ClusterSync

log = logging.getLogger("service")


class RuntimeState(Enum):
    """Lifecycle of a runtime."""

    CREATED = "created"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    STOPPED = "stopped"


def forward_parallelism(settings: ServiceSettings, device: torch.device) -> tuple[int, int | None]:
    """(forward workers, torch intra-op threads or None to leave torch's) from settings and the device."""
    if device.type != "cpu":
        return settings.forward_workers or 1, settings.torch_threads
    workers = settings.forward_workers or 2
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return workers, settings.torch_threads or max(1, cores // workers)


def make_store(settings: ServiceSettings) -> AdapterStore:
    if settings.s3_endpoint:
        if not settings.redis_url:
            raise ConfigurationError("ADAPTER_SERVICE_S3_ENDPOINT needs ADAPTER_SERVICE_REDIS_URL: the bucket holds "
                                     "bundle bytes, Redis the registry")
        from service.cluster.s3_store import S3RedisAdapterStore

        return S3RedisAdapterStore.from_settings(settings)
    if settings.redis_url:
        from service.cluster.redis_store import RedisAdapterStore

        return RedisAdapterStore.from_settings(settings)
    return LocalAdapterStore(settings.store_dir)


class Runtime:
    """The serving runtime of one process. `backbone` and `store` may be injected (tests); otherwise they
    come from settings when `start` runs. Hooks observe batches and adapter loads (metrics)."""

    def __init__(
        self, settings: ServiceSettings, *, backbone: Backbone | None = None, store: AdapterStore | None = None,
        on_batch: Callable[[BatchStats], None] | None = None,
        on_adapter_load: Callable[[CacheEntry, float], None] | None = None,
    ):
        self.settings = settings
        self.state = RuntimeState.CREATED
        self._backbone, self._store = backbone, store
        self._on_batch, self._on_adapter_load = on_batch, on_adapter_load
        self._engine: Engine | None = None
        self._registry: TaskRegistry | None = None
        self._batcher: Batcher | None = None
        self._manager: AdapterManager | None = None
        self.cluster: ClusterSync | None = None  # with a Redis registry, once started

    def add_hooks(self, *, on_batch: Callable[[BatchStats], None] | None = None,
                  on_adapter_load: Callable[[CacheEntry, float], None] | None = None) -> None:
        """Observe batches and adapter loads (the app's metrics); before `start`."""
        if self.state is not RuntimeState.CREATED:
            raise RuntimeError("hooks are added before the runtime starts")
        self._on_batch = on_batch or self._on_batch
        self._on_adapter_load = on_adapter_load or self._on_adapter_load

    # --- what the routes use (NotReady until started) -------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.state is RuntimeState.READY and self._batcher is not None and self._batcher.running

    @property
    def engine(self) -> Engine:
        return _started(self._engine)

    @property
    def registry(self) -> TaskRegistry:
        return _started(self._registry)

    @property
    def batcher(self) -> Batcher:
        return _started(self._batcher)

    @property
    def manager(self) -> AdapterManager:
        return _started(self._manager)

    @property
    def store(self) -> AdapterStore | None:
        """The adapter store, once opened (None while starting)."""
        return self._store

    # --- lifecycle ------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the backbone, open the store, build engine, registry, batcher and manager, join the cluster."""
        s = self.settings
        self.state = RuntimeState.STARTING
        backbone = self._backbone
        if backbone is None:
            backbone = await asyncio.to_thread(load_backbone, s.backbone, s.device, s.dtype)
        workers, _ = forward_parallelism(s, backbone.device)
        log.info("forward workers: %d, torch threads each: %d", workers, torch.get_num_threads())
        self._store = store = self._store or make_store(s)
        engine = Engine(
            backbone, store, cache_max_bytes=s.cache_max_bytes, cache_max_slots=s.cache_max_slots,
            cache_wait_s=s.cache_wait_s, host_cache_bytes=s.host_cache_bytes, max_seq_length=s.max_seq_length, strategy=s.mixed_strategy,
            packing=s.packing, upload_max_bytes=s.upload_max_bytes, on_adapter_load=self._on_adapter_load,
        )
        registry = TaskRegistry(store, on_change=self._task_changed)
        self._engine, self._registry = engine, registry
        try:
            await asyncio.to_thread(registry.refresh_all)
        except StoreUnavailable as exc:  # serve what we can; resync fills the registry once the store is back
            log.error("adapter store unavailable at start: %s", exc.message)
        engine.check_cache_budget([view.manifest for view in registry.snapshot().values()])
        batcher = Batcher(
            engine, max_batch_size=s.max_batch_size, max_batch_tokens=s.max_batch_tokens, packed=engine.packed,
            max_wait_ms=s.max_wait_ms, queue_limit=s.queue_limit, workers=workers,
            budget=CacheBudget(engine.cache.max_slots, engine.cache.max_bytes), on_batch=self._on_batch,
        )
        # With Redis, the store itself publishes every write (after it is durable); the sync follows them.
        self.cluster = self._start_cluster(store, registry)
        self._manager = AdapterManager(store, engine, registry)
        self._batcher = batcher
        await batcher.start()
        self.state = RuntimeState.READY
        p = backbone.precision
        log.info("ready: backbone %s on %s in %s (%s), %s forwards, %d tasks", backbone.ref.id, backbone.device,
                 p.mode, p.reason, "packed" if engine.packed else "padded", len(registry.snapshot()))

    async def stop(self) -> None:
        """Leave the cluster, fail queued rows with NotReady, finish running batches."""
        self.state = RuntimeState.STOPPING
        if self.cluster is not None:
            await asyncio.to_thread(self.cluster.stop)
        if self._batcher is not None:
            await self._batcher.stop()
        self.state = RuntimeState.STOPPED

    # --- wiring ---------------------------------------------------------------------------------------

    def _task_changed(self, task: str, old: TaskView | None, new: TaskView | None) -> None:
        """Drop the task's other versions from the device and host memory (handing their freed pages back to
        the kernel); pre-load the new one if the old was hot."""
        engine = self.engine
        was_resident = old is not None and engine.cache.is_resident(task, old.version)
        engine.cache.invalidate(task, keep_version=new.version if new else None)
        engine.host_cache.forget(task, keep_version=new.version if new else None)
        release_freed_memory()
        if new is not None and was_resident:
            try:
                engine.warm(task, new.version)
            except CacheFull:  # every slot in use right now: it loads with its first request
                log.debug("not pre-loaded (no free slot): %s@%d", task, new.version)
            except Exception:
                log.warning("could not pre-load %s@%d", task, new.version, exc_info=True)

    def _start_cluster(self, store: AdapterStore, registry: TaskRegistry) -> ClusterSync | None:
        """With a Redis registry: subscribe to other replicas' writes and resync periodically."""
        if not self.settings.redis_url:
            return None
        from service.cluster.redis_store import RedisAdapterStore
        from service.cluster.sync import start_cluster_sync

        if not isinstance(store, RedisAdapterStore):
            raise ConfigurationError("ADAPTER_SERVICE_REDIS_URL is set, but the runtime was given another store")
        return start_cluster_sync(self.settings, store, on_task_changed=registry.refresh,
                                  on_resync=registry.refresh_all)


T = TypeVar("T")


def _started(part: T | None) -> T:
    if part is None:
        raise NotReady("the service is starting; retry shortly")
    return part
