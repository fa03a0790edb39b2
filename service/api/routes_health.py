"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from service.api.contract import RETRY_AFTER, errors
from service.api.deps import Services
from service.api.responses import JSON
from service.api.schemas import HealthResponse, NotReadyBody, ReadyResponse
from service.errors import ServiceError
from service.runtime.runtime import RuntimeState

router = APIRouter(tags=["health"])

# How long /readyz waits for the store's answer: under the 3 s timeout of the deploy/ probes, so a store
# that hangs (a blackholed bucket: boto3 retries within its own 5 s timeouts) reads as a failed check, not
# as a probe timeout that would take every replica out of rotation at once.
STORE_CHECK_S = 2.0


@router.get("/healthz", operation_id="healthz", response_model=HealthResponse)
async def healthz():
    """The process is alive and its event loop answers."""
    return {"status": "ok"}


@router.get("/readyz", operation_id="readyz", response_model=ReadyResponse, responses={
    **errors(422, e422="allow_degraded is not a boolean"),
    503: {"model": NotReadyBody, "description": "Not ready: the body says which check failed", "headers": RETRY_AFTER},
})
async def readyz(request: Request, allow_degraded: bool = False):
    """Ready to serve: backbone loaded, batcher running, store reachable (and the Redis registry connected).

    `?allow_degraded=true` (for load-balancer readiness probes) answers 200 while this replica can still
    serve its resident tasks, with `"status": "degraded"` and the failing checks: a shared Redis outage must
    not take every replica out of rotation at once."""
    svc: Services = request.app.state.svc
    rt = svc.runtime
    started = rt.state is RuntimeState.READY
    checks: dict[str, str] = {"backbone": "ok" if started else rt.state.value,
                              "batcher": "ok" if rt.ready else "stopped"}
    if svc.store is not None:
        try:
            await asyncio.wait_for(run_in_threadpool(svc.store.ping), STORE_CHECK_S)
            checks["store"] = "ok"
        except TimeoutError:
            checks["store"] = f"no answer within {STORE_CHECK_S:g} s"
        except ServiceError as exc:
            checks["store"] = exc.message
    else:
        checks["store"] = "not configured yet"
    if rt.cluster is not None:
        health = rt.cluster.health()
        checks["cluster"] = "ok" if health.connected else f"disconnected: {health.last_error or 'connecting'}"
    failed = {k: v for k, v in checks.items() if v != "ok"}
    can_serve = checks["backbone"] == "ok" and checks["batcher"] == "ok"
    if failed and not (allow_degraded and can_serve):
        detail = "not ready: " + "; ".join(f"{k} {v}" for k, v in failed.items())
        return JSON({"detail": detail, "checks": checks}, status_code=503, headers={"Retry-After": "5"})
    return JSON({"status": "degraded" if failed else "ready", "checks": checks,
                 "backbone": svc.engine.backbone.ref.id, **svc.engine.compute_info()})


@router.get("/metrics", operation_id="metrics", response_class=Response, responses={
    200: {"description": "Prometheus text exposition format",
          "content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}},
})
async def metrics(request: Request):
    """Prometheus text format."""
    return Response(generate_latest(request.app.state.svc.metrics.registry), media_type=CONTENT_TYPE_LATEST)
