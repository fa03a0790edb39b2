"""The one place where domain errors become HTTP responses: `{"detail": "<what is wrong>"}`."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response

from service.api.contract import allowed_methods
from service.api.responses import JSON
from service.errors import (
    BackboneLoadError,
    BundleInvalid,
    BundleTooLarge,
    InputTooLarge,
    InvalidInput,
    InvalidTaskName,
    NotReady,
    Overloaded,
    ServiceError,
    StoreUnavailable,
    TaskNotFound,
    UnsupportedMediaType,
    VersionNotFound,
)

log = logging.getLogger(__name__)

# Most specific first: BundleTooLarge is a BundleInvalid, CacheFull an Overloaded.
_STATUS: list[tuple[type[ServiceError], int]] = [
    (TaskNotFound, 404),
    (VersionNotFound, 404),
    (InvalidTaskName, 404),
    (BundleTooLarge, 413),
    (InputTooLarge, 413),
    (UnsupportedMediaType, 415),
    (BundleInvalid, 422),
    (InvalidInput, 422),
    (Overloaded, 503),
    (StoreUnavailable, 503),
    (NotReady, 503),
    (BackboneLoadError, 503),
]


def status_for(exc: BaseException) -> int:
    for cls, status in _STATUS:
        if isinstance(exc, cls):
            return status
    return 500


def error_parts(exc: BaseException) -> tuple[int, str, dict[str, str]]:
    """The one mapping of an error to (status, message, headers), for every protocol's error body; logs a 500."""
    status = status_for(exc)
    if status == 500 or not isinstance(exc, ServiceError):  # only ServiceErrors get other statuses
        log.error("unhandled error: %r", exc, exc_info=exc)
        return 500, "internal server error", {}
    headers = {}
    if isinstance(exc, Overloaded):
        headers["Retry-After"] = str(max(1, round(exc.retry_after)))
    elif status == 503:
        headers["Retry-After"] = "5"
    return status, exc.message, headers


def error_response(exc: BaseException) -> JSON:
    status, message, headers = error_parts(exc)
    return JSON({"detail": message}, status_code=status, headers=headers)


def describe_validation_error(exc: RequestValidationError) -> str:
    """One readable sentence from pydantic's error list, e.g. "body.texts: List should have at most 64 items"."""
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
        msg = err.get("msg", "invalid value")
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _domain(request: Request, exc: ServiceError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return JSON({"detail": describe_validation_error(exc)}, status_code=422)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        """Starlette's own answers (404 no route, 405, 400 unparsable body, auth) in the one error shape; a
        405 lists every method of the path in `Allow`, and OPTIONS answers 204 with that `Allow`."""
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = ", ".join(allowed_methods(request.app, request.scope))
            if request.method == "OPTIONS":
                return Response(status_code=204, headers=headers)
            return JSON({"detail": f"{request.method} is not allowed here; allowed: {headers['Allow']}"},
                        status_code=405, headers=headers)
        if exc.status_code == 404 and exc.detail == "Not Found":
            return JSON({"detail": f"no such path: {request.url.path}"}, status_code=404, headers=headers)
        return JSON({"detail": exc.detail}, status_code=exc.status_code, headers=headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        return error_response(exc)
