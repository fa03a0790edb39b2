"""The Open Inference Protocol (KServe v2 REST): `/v2/...` for KServe and Triton clients, unchanged.

    GET  /v2                                         server metadata
    GET  /v2/health/live | /v2/health/ready          200, or 503 while not ready
    GET  /v2/models/{task}[/versions/{version}]      model metadata: input and output tensors
    GET  /v2/models/{task}[/versions/{version}]/ready
    POST /v2/models/{task}[/versions/{version}]/infer

A model is a task; its version is the task's active version (the only one served: asking for another is a
404). Inference goes the way of /predict (registry -> engine.encode -> the shared batcher), so v2 and
/predict rows of every task share forwards, and the input tensors become the `PredictRequest` /predict
validates: the same limits, the same messages. Tensors by head type: `service/api/oip_tensors.py`.

JSON tensors only: a request using the binary tensor data extension (`Inference-Header-Content-Length`) is a
400; outputs asked for as binary (`binary_data`, `binary_data_output`) are answered as JSON tensors, which
clients read the same way. The body is read as JSON whatever its Content-Type (Triton's client sends none).

Errors answer the protocol's `{"error": "<message>"}`: a domain error gets its status from
`service.api.errors` (the one mapping), except that a request that does not fit the model (422 there) is the
protocol's 400. Readiness follows the protocol: 200 is true, anything else false; not ready is 503 (with
Retry-After), as KServe's own model server answers it. Server readiness is the runtime's (backbone loaded,
batcher running): a replica that lost the shared Redis still serves its resident tasks, so it stays ready,
as /readyz?allow_degraded=true says.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Annotated, Any, cast

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError

from service import __version__
from service.api.auth import require_api_key
from service.api.contract import errors
from service.api.deps import Services, services
from service.api.errors import describe_validation_error, error_parts
from service.api.oip_schemas import (
    INFER_EXAMPLES,
    InferenceRequest,
    InferenceResponse,
    ModelMetadata,
    ModelReady,
    OipError,
    ServerLive,
    ServerMetadata,
    ServerReady,
)
from service.api.oip_tensors import (
    model_metadata,
    output_specs,
    output_tensors,
    predict_request,
    select_outputs,
)
from service.api.responses import JSON
from service.api.serving import live_view, metrics_label, predict_rows
from service.runtime.registry import TaskView

SERVER_NAME = PLATFORM = "adapter-service"
BINARY_HEADER = "inference-header-content-length"


class Refused(Exception):
    """A v2-only refusal (no domain error says it): answered as `{"error": message}` with `status`."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def v2_error(exc: Exception) -> JSON:
    """`exc` as the protocol's error answer; domain errors take their status from `service.api.errors`."""
    if isinstance(exc, Refused):
        return JSON({"error": exc.message}, status_code=exc.status)
    if isinstance(exc, HTTPException):  # auth: 401 (with WWW-Authenticate) / 403
        return JSON({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)
    if isinstance(exc, RequestValidationError):
        return JSON({"error": describe_validation_error(exc)}, status_code=400)
    status, message, headers = error_parts(exc)  # the one mapping (and the log line of a 500)
    return JSON({"error": message}, status_code=400 if status == 422 else status, headers=headers)


class OipRoute(APIRoute):
    """Every error of a v2 route, whatever raised it (auth, a dependency, the handler), in the v2 shape."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def handler(request: Request) -> Response:
            if BINARY_HEADER in request.headers:
                return JSON({"error": "the binary tensor data extension (Inference-Header-Content-Length) is not "
                             "supported: send every tensor as JSON, its elements in 'data'"}, status_code=400)
            try:
                return await handle(request)
            except Exception as exc:  # not CancelledError (a BaseException): a client gone away stays so
                return v2_error(exc)

        return handler


# Handlers answer `JSON` (orjson) themselves; a JSONResponse class here makes FastAPI publish each route's
# response model as its 200 body.
router = APIRouter(tags=["open inference protocol (v2)"], route_class=OipRoute, default_response_class=JSONResponse)

DESCRIPTIONS = {
    400: "A malformed body, or tensors that do not fit the model (name, datatype, shape), an empty text, more "
         "texts than allowed, the binary tensor data extension",
    401: "Missing API key (when one is configured)",
    403: "Wrong API key",
    404: "Unknown model (task), or a version that is not the active one",
    413: "A text is over the configured character limit",
    503: "Not ready, or overloaded (with Retry-After)",
}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return errors(*codes, model=OipError, descriptions=DESCRIPTIONS)


# Path parameters are read from the request, not declared on the handlers, so FastAPI does not document a
# 422 these routes never answer (their errors are v2's 400); the OpenAPI gets them from here.
def _path_params(*names: str) -> list[dict[str, Any]]:
    what = {"task": "The model: a task name", "version": "The model version: the task's active version"}
    return [{"name": n, "in": "path", "required": True, "schema": {"type": "string"}, "description": what[n]}
            for n in names]


def _inline(model: type[BaseModel]) -> dict[str, Any]:
    """`model`'s JSON schema with its `$defs` written in place (an OpenAPI request body cannot carry them)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    return cast("dict[str, Any]", resolve(schema))


INFER_BODY = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": _inline(InferenceRequest), "examples": INFER_EXAMPLES}}}}


async def _view(svc: Services, task: str, version: str | None) -> TaskView:
    """The task's live view, the way /predict resolves it; `version`, when given, must be the active one."""
    view = await live_view(svc, task)
    if version is not None and version != str(view.version):
        raise Refused(404, f"task '{task}' serves only its active version, {view.version}, not version '{version}'")
    return view


# --- health and server metadata (no auth: probes call them) --------------------------------------


@router.get("/v2", response_model=ServerMetadata)
async def server_metadata():
    """Server metadata: name, version, the protocol extensions supported (none)."""
    return JSON({"name": SERVER_NAME, "version": __version__, "extensions": []})


@router.get("/v2/health/live", response_model=ServerLive)
async def server_live():
    """The server answers (the Kubernetes liveness probe)."""
    return JSON({"live": True})


@router.get("/v2/health/ready", response_model=ServerReady, responses=_errors(503))
async def server_ready(request: Request):
    """Ready for inference (the Kubernetes readiness probe): the backbone is loaded and the batcher runs; 503
    while starting or stopping."""
    if not request.app.state.svc.ready:
        return JSON({"error": "not ready: the service is starting or stopping"}, status_code=503,
                    headers={"Retry-After": "5"})
    return JSON({"ready": True})


# --- models --------------------------------------------------------------------------------------


async def _metadata(request: Request, svc: Services, version: str | None) -> JSON:
    task = request.path_params["task"]
    view = await _view(svc, task, version)
    m = view.manifest
    return JSON(model_metadata(task, view.version, m.kind, m.labels, PLATFORM))


async def _ready(request: Request, svc: Services, version: str | None) -> JSON:
    task = request.path_params["task"]
    await _view(svc, task, version)  # unknown: 404; not ready: 503 (from `services`)
    return JSON({"name": task, "ready": True})


AUTH = [Depends(require_api_key)]
MODEL_ERRORS = _errors(401, 403, 404, 503)


@router.get("/v2/models/{task}", dependencies=AUTH, response_model=ModelMetadata, responses=MODEL_ERRORS,
            openapi_extra={"parameters": _path_params("task")})
async def get_model_metadata(request: Request, svc: Annotated[Services, Depends(services)]):
    """Model metadata: the task's input and output tensors (by its head type), its version, and as
    parameters its head type and labels (the column order of `scores`)."""
    return await _metadata(request, svc, None)


@router.get("/v2/models/{task}/versions/{version}", dependencies=AUTH, response_model=ModelMetadata,
            responses=MODEL_ERRORS, openapi_extra={"parameters": _path_params("task", "version")})
async def get_model_version_metadata(request: Request, svc: Annotated[Services, Depends(services)]):
    """Model metadata of one version (the active one)."""
    return await _metadata(request, svc, request.path_params["version"])


@router.get("/v2/models/{task}/ready", dependencies=AUTH, response_model=ModelReady, responses=MODEL_ERRORS,
            openapi_extra={"parameters": _path_params("task")})
async def model_ready(request: Request, svc: Annotated[Services, Depends(services)]):
    """The task can be served (its adapters load on first use, in milliseconds)."""
    return await _ready(request, svc, None)


@router.get("/v2/models/{task}/versions/{version}/ready", dependencies=AUTH, response_model=ModelReady,
            responses=MODEL_ERRORS, openapi_extra={"parameters": _path_params("task", "version")})
async def model_version_ready(request: Request, svc: Annotated[Services, Depends(services)]):
    """One version (the active one) can be served."""
    return await _ready(request, svc, request.path_params["version"])


# --- inference -----------------------------------------------------------------------------------


async def _infer(request: Request, svc: Services, version: str | None) -> JSON:
    task = request.path_params["task"]
    t0 = time.perf_counter()
    try:
        try:
            body = InferenceRequest.model_validate_json(await request.body())
        except ValidationError as exc:
            raise RequestValidationError(exc.errors()) from None
        view = await _view(svc, task, version)
        kind = view.manifest.kind
        chosen = select_outputs(output_specs(kind, view.manifest.labels), body.outputs)
        predictions = await predict_rows(svc, task, view, predict_request(kind, body.inputs))
        response = JSON({"model_name": task, "model_version": str(view.version), "id": body.id or str(uuid.uuid4()),
                         "outputs": output_tensors(chosen, predictions)})
    except asyncio.CancelledError:
        svc.metrics.observe_request(metrics_label(svc, task), 499, time.perf_counter() - t0)  # 499: client went away
        raise
    except Exception as exc:
        response = v2_error(exc)
    svc.metrics.observe_request(metrics_label(svc, task), response.status_code, time.perf_counter() - t0)
    return response


INFER_ERRORS = _errors(400, 401, 403, 404, 413, 503)


@router.post("/v2/models/{task}/infer", dependencies=AUTH, response_model=InferenceResponse, responses=INFER_ERRORS,
             openapi_extra={**INFER_BODY, "parameters": _path_params("task")})
async def infer(request: Request, svc: Annotated[Services, Depends(services)]):
    """Inference with BYTES text tensors; rows share backbone forwards with /predict and every other task."""
    return await _infer(request, svc, None)


@router.post("/v2/models/{task}/versions/{version}/infer", dependencies=AUTH, response_model=InferenceResponse,
             responses=INFER_ERRORS,
             openapi_extra={**INFER_BODY, "parameters": _path_params("task", "version")})
async def infer_version(request: Request, svc: Annotated[Services, Depends(services)]):
    """Inference with one version (the active one)."""
    return await _infer(request, svc, request.path_params["version"])
