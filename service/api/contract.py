"""What the published OpenAPI promises, kept in one place so the server and its schema cannot drift apart.

- `errors(...)`: the error answers an operation declares, all with the one error model (`ErrorBody`).
- `require_media_type(...)`: a body in any other media type is a 415, before the body is read as JSON.
- `allowed_methods(...)`: the `Allow` header of a 405 (and of an OPTIONS answer) lists every method the
  path serves, not only those of the first route that matched it.
- `finish_openapi(...)`: the parts FastAPI cannot derive: the input limits of this server's settings and
  the links between operations (upload -> describe / activate / predict / delete) that stateful clients
  and fuzzers follow.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from typing import Any

from fastapi import Depends, FastAPI, Request
from pydantic import BaseModel
from starlette.routing import compile_path
from starlette.types import Scope

from service.api.schemas import ErrorBody
from service.errors import UnsupportedMediaType
from service.settings import ServiceSettings

ERROR_DESCRIPTIONS: dict[int, str] = {
    400: "The body could not be parsed",
    401: "Missing bearer token (`WWW-Authenticate: Bearer`)",
    403: "Wrong token",
    404: "Unknown task",
    413: "Over a configured size limit",
    415: "The body is not in a media type this operation takes",
    422: "A body or parameter that does not fit (the message names the field and the problem)",
    503: "Not ready, overloaded or the store is unreachable: retry after `Retry-After` seconds",
}

RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying", "schema": {"type": "integer"}}}
WWW_AUTHENTICATE = {"WWW-Authenticate": {"description": "`Bearer`", "schema": {"type": "string"}}}


def errors(*codes: int, model: type[BaseModel] = ErrorBody, descriptions: Mapping[int, str] = ERROR_DESCRIPTIONS,
           **described: str) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route: each code with its error body `model` and a description from `descriptions`
    (`e404="Unknown version"` overrides it), and the headers the service sends with it."""
    out: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        entry: dict[str, Any] = {"model": model, "description": described.get(f"e{code}", descriptions[code])}
        if code == 503:
            entry["headers"] = RETRY_AFTER
        elif code == 401:
            entry["headers"] = WWW_AUTHENTICATE
        out[code] = entry
    return out


def require_media_type(*accepted: str) -> Callable[[Request], Awaitable[None]]:
    """A dependency: the request's Content-Type (without parameters) must be one of `accepted`."""

    async def check(request: Request) -> None:
        given = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if given not in accepted:
            raise UnsupportedMediaType(f"Content-Type must be {' or '.join(accepted)}; got {given or 'none'}")

    return check


JSON_BODY = Depends(require_media_type("application/json"))
"""The dependency of every route that takes a JSON body."""


def allowed_methods(app: FastAPI, scope: Scope) -> list[str]:
    """Every method some route serves at this request's path."""
    path = scope.get("path", "")
    methods: set[str] = set()
    for prefix, route in _routes(app.router.routes, ""):
        regex = compile_path(prefix + route.path)[0] if prefix else route.path_regex
        if regex.match(path):
            methods |= set(route.methods or ())
    return sorted(methods)


def _routes(routes: Iterable[Any], prefix: str) -> Iterator[tuple[str, Any]]:
    """(include prefix, route) for every route with methods, through routers included in routers."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            yield from _routes(inner.routes, prefix + getattr(route.include_context, "prefix", ""))
        elif getattr(route, "methods", None) and hasattr(route, "path_regex"):
            yield prefix, route


def finish_openapi(schema: dict[str, Any], settings: ServiceSettings) -> dict[str, Any]:
    """Add this server's input limits to the request bodies and the links between task operations."""
    comps = schema.get("components", {}).get("schemas", {})
    _one_validation_error_model(schema, comps)
    for name in ("PredictRequest", "EmbedRequest"):
        for shape in comps.get(name, {}).get("oneOf", [comps.get(name, {})]):
            for prop in shape.get("properties", {}).values():
                _limit(prop, settings)
    upload = schema["paths"].get("/adapters", {}).get("post", {}).get("responses", {}).get("201")
    if upload is not None:
        task = {"task": "$response.body#/task"}
        upload["links"] = {
            "DescribeTask": {"operationId": "describe_adapter", "parameters": task},
            "ActivateVersion": {"operationId": "activate_adapter", "parameters": task,
                                "requestBody": {"version": "$response.body#/version"}},
            "PredictTask": {"operationId": "predict", "parameters": task},
            "DeleteTask": {"operationId": "delete_adapter", "parameters": task},
        }
    return schema


def _one_validation_error_model(schema: dict[str, Any], comps: dict[str, Any]) -> None:
    """FastAPI declares its own 422 model where a route does not; this server answers every 422 with
    `ErrorBody` (service.api.errors), so the schema says that."""
    for operations in schema["paths"].values():
        for op in operations.values():
            body = op.get("responses", {}).get("422", {}).get("content", {}).get("application/json", {})
            if body.get("schema", {}).get("$ref", "").endswith("/HTTPValidationError"):
                body["schema"] = {"$ref": "#/components/schemas/ErrorBody"}
                op["responses"]["422"]["description"] = ERROR_DESCRIPTIONS[422]
    comps.pop("HTTPValidationError", None)
    comps.pop("ValidationError", None)


def _limit(prop: dict[str, Any], settings: ServiceSettings) -> None:
    if prop.get("type") == "string":
        prop["maxLength"] = settings.max_text_chars
    elif prop.get("type") == "array":
        prop["maxItems"] = settings.max_items_per_request
        _limit(prop.get("items", {}), settings)
