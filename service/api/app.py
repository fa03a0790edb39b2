"""`create_app(settings)`: the one place where the service is wired together.

Start-up loads the backbone once (CUDA when available), opens the store (local folder, or Redis when
`redis_url` is set), builds the engine, the task registry, the batcher and the adapter manager, and (with
Redis) starts the cluster sync whose events refresh the registry. Settings are built here, never at
import time.
"""

from __future__ import annotations

import logging
import os
import secrets
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Receive, Scope, Send

from service import __version__
from service.api.deps import Services
from service.api.errors import install_error_handlers
from service.api.metrics import Metrics
from service.api.responses import JSON
from service.api.routes_adapters import router as adapters_router
from service.api.routes_health import router as health_router
from service.api.routes_predict import router as predict_router
from service.bundles.store import AdapterStore, LocalAdapterStore
from service.errors import StoreUnavailable
from service.host_memory import keep_freed_memory
from service.modeling.backbone import Backbone, load_backbone
from service.runtime.adapters import AdapterManager
from service.runtime.batcher import Batcher, CacheBudget
from service.runtime.engine import Engine
from service.runtime.registry import TaskRegistry, TaskView
from service.settings import ServiceSettings

log = logging.getLogger("service")


class UploadSizeLimit:
    """Refuse an upload whose Content-Length is already over the limit, before reading its body."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"].rstrip("/") == "/adapters":
            length = dict(scope["headers"]).get(b"content-length")
            if length is not None and length.isdigit() and int(length) > self.limit + 64 * 1024:  # + form overhead
                msg = f"upload is {int(length)} bytes, over the limit of {self.limit} bytes"
                await JSON({"detail": msg}, status_code=413, headers={"Connection": "close"})(scope, receive, send)
                return
        await self.app(scope, receive, send)


def make_store(settings: ServiceSettings) -> AdapterStore:
    if settings.redis_url:
        from service.cluster.redis_store import RedisAdapterStore

        return RedisAdapterStore.from_settings(settings)
    return LocalAdapterStore(settings.store_dir)


def forward_parallelism(settings: ServiceSettings, device: torch.device) -> tuple[int, int | None]:
    """(forward workers, torch intra-op threads or None to leave torch's) from settings and the device."""
    if device.type != "cpu":
        return settings.forward_workers or 1, settings.torch_threads
    workers = settings.forward_workers or 2
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return workers, settings.torch_threads or max(1, cores // workers)


def create_app(
    settings: ServiceSettings | None = None, *, backbone: Backbone | None = None, store: AdapterStore | None = None,
) -> FastAPI:
    """Build the app. `backbone` and `store` may be injected (tests); otherwise they come from settings."""
    settings = settings or ServiceSettings()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    generated = settings.admin_token is None
    admin_token = secrets.token_urlsafe(32) if generated else settings.admin_token.get_secret_value()
    api_key = settings.api_key.get_secret_value() if settings.api_key is not None else None
    metrics = Metrics()
    svc = Services(settings=settings, metrics=metrics, admin_token=admin_token, api_key=api_key)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if generated:
            log.warning("ADAPTER_SERVICE_ADMIN_TOKEN is not set; generated admin token for this run: %s", admin_token)
        if settings.keep_freed_host_memory:
            keep_freed_memory()
        bb = backbone or await run_in_threadpool(load_backbone, settings.backbone, settings.device, settings.dtype)
        workers, threads = forward_parallelism(settings, bb.device)
        if threads is not None:
            torch.set_num_threads(threads)
        log.info("forward workers: %d, torch threads each: %d", workers, torch.get_num_threads())
        svc.store = store or make_store(settings)
        engine = Engine(
            bb, svc.store, cache_max_bytes=settings.cache_max_bytes, cache_max_slots=settings.cache_max_slots,
            cache_wait_s=settings.cache_wait_s, max_seq_length=settings.max_seq_length, strategy=settings.mixed_strategy,
            packing=settings.packing,
            upload_max_bytes=settings.upload_max_bytes, on_adapter_load=metrics.observe_load,
        )

        def on_task_change(task: str, old: TaskView | None, new: TaskView | None) -> None:
            """Drop the task's other versions from the device; pre-load the new one if the old was hot."""
            was_resident = old is not None and engine.cache.is_resident(task, old.version)
            engine.cache.invalidate(task, keep_version=new.version if new else None)
            if new is not None and was_resident:
                try:
                    engine.warm(task, new.version)
                except Exception:
                    log.warning("could not pre-load %s@%d", task, new.version, exc_info=True)

        registry = TaskRegistry(svc.store, on_change=on_task_change)
        try:
            await run_in_threadpool(registry.refresh_all)
        except StoreUnavailable as exc:  # serve what we can; resync fills the registry once the store is back
            log.error("adapter store unavailable at start: %s", exc.message)
        engine.check_cache_budget([view.manifest for view in registry.snapshot().values()])
        batcher = Batcher(
            engine, max_batch_size=settings.max_batch_size, max_batch_tokens=settings.max_batch_tokens,
            packed=engine.packed, max_wait_ms=settings.max_wait_ms, queue_limit=settings.queue_limit, workers=workers,
            budget=CacheBudget(engine.cache.max_slots, engine.cache.max_bytes), on_batch=metrics.observe_batch,
        )
        # With Redis, the store itself publishes every write (after it is durable); the sync follows them.
        svc.cluster = _start_cluster(settings, svc.store, registry)
        svc.manager = AdapterManager(svc.store, engine, registry)
        svc.engine, svc.registry, svc.batcher = engine, registry, batcher
        metrics.bind(cache_stats=lambda: engine.cache.stats, queue_depth=lambda: batcher.depth,
                     waiting_for_slot=lambda: batcher.waiting_for_slot)
        await batcher.start()
        metrics.compute.info(engine.compute_info())
        log.info("ready: backbone %s on %s in %s (%s), %s forwards, %d tasks", bb.ref.id, bb.device,
                 bb.precision.mode, bb.precision.reason, "packed" if engine.packed else "padded",
                 len(registry.snapshot()))
        try:
            yield
        finally:
            if svc.cluster is not None:
                await run_in_threadpool(svc.cluster.stop)
            await batcher.stop()

    app = FastAPI(
        title="adapter-service",
        version=__version__,
        summary="Many NLP tasks on one frozen backbone: bottleneck adapters + heads, batched across tasks.",
        lifespan=lifespan,
        default_response_class=JSON,
    )
    app.state.svc = svc
    install_error_handlers(app)
    app.include_router(predict_router)
    app.include_router(adapters_router)
    app.include_router(health_router)
    app.add_middleware(UploadSizeLimit, limit=settings.upload_max_bytes)
    return app


def _start_cluster(settings: ServiceSettings, store: AdapterStore, registry: TaskRegistry):
    """With a Redis registry: subscribe to other replicas' writes and resync periodically."""
    if not settings.redis_url:
        return None
    from service.cluster.sync import start_cluster_sync

    return start_cluster_sync(settings, store, on_task_changed=registry.refresh, on_resync=registry.refresh_all)
