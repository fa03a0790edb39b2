"""`create_app(settings | runtime)`: HTTP routes around a runtime (`service.runtime.runtime.Runtime`).

The app starts the runtime in its lifespan and stops it on shutdown; it adds what only HTTP needs: auth
tokens, Prometheus metrics, error mapping and the upload size limit. Process-wide setup (logging, torch
threads, the host allocator) belongs to the command that starts the process (`adapter-service serve`).
"""

from __future__ import annotations

import logging
import secrets
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from service import __version__
from service.api.contract import finish_openapi
from service.api.deps import Services
from service.api.errors import install_error_handlers
from service.api.keys import KeyRing
from service.api.metrics import Metrics
from service.api.responses import JSON
from service.api.routes_adapters import router as adapters_router
from service.api.routes_health import router as health_router
from service.api.routes_oip import router as oip_router
from service.api.routes_predict import router as predict_router
from service.runtime.runtime import Runtime
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


def create_app(config: ServiceSettings | Runtime | None = None) -> FastAPI:
    """Build the app around `config`: a Runtime (tests inject one with their own backbone and store), or
    settings to build one from (default: `ServiceSettings()` from the environment)."""
    metrics = Metrics()
    if isinstance(config, Runtime):
        runtime = config
        runtime.add_hooks(on_batch=metrics.observe_batch, on_adapter_load=metrics.observe_load)
    else:
        runtime = Runtime(config or ServiceSettings(), on_batch=metrics.observe_batch,
                          on_adapter_load=metrics.observe_load)
    settings = runtime.settings
    generated = settings.admin_token is None
    admin_token = (secrets.token_urlsafe(32) if settings.admin_token is None
                   else settings.admin_token.get_secret_value())
    api_key = settings.api_key.get_secret_value() if settings.api_key is not None else None
    keys = KeyRing(settings.api_keys_file, all_tasks_key=api_key)
    svc = Services(settings=settings, metrics=metrics, admin_token=admin_token, keys=keys, runtime=runtime)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if generated:
            log.warning("ADAPTER_SERVICE_ADMIN_TOKEN is not set; generated admin token for this run: %s", admin_token)
        await runtime.start()
        engine, batcher = runtime.engine, runtime.batcher
        metrics.bind(cache_stats=lambda: engine.cache.stats, queue_depth=lambda: batcher.depth,
                     waiting_for_slot=lambda: batcher.waiting_for_slot)
        metrics.compute.info(engine.compute_info())
        try:
            yield
        finally:
            await runtime.stop()

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
    app.include_router(oip_router)
    app.add_middleware(UploadSizeLimit, limit=settings.upload_max_bytes)

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = finish_openapi(FastAPI.openapi(app), settings)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
