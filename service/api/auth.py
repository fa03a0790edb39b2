"""Bearer-token auth: the admin token for management endpoints; API keys for predict and read endpoints.

Missing credentials or a key this service does not know -> 401 (with `WWW-Authenticate: Bearer`); a wrong
admin token, or a key not allowed the task -> 403. Comparisons are constant-time. API keys are off unless
`api_key` (one key for every task) or `api_keys_file` (per-task keys, `service.api.keys`) is configured;
the admin token is accepted wherever a key is. Tokens are never logged or returned (the generated admin
token is logged once, at start, by the app factory).
"""

from __future__ import annotations

import hmac

from fastapi import HTTPException, Request

from service.api.keys import Access


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def _missing(what: str) -> HTTPException:
    return HTTPException(401, f"missing {what}: send 'Authorization: Bearer <token>'",
                         headers={"WWW-Authenticate": "Bearer"})


def _is_admin(request: Request, token: str) -> bool:
    return hmac.compare_digest(token.encode(), request.app.state.svc.admin_token.encode())


async def require_admin(request: Request) -> None:
    """Dependency for management endpoints."""
    token = _bearer(request)
    if token is None:
        raise _missing("admin token")
    if not _is_admin(request, token):
        raise HTTPException(403, "invalid admin token")


async def require_api_key(request: Request) -> None:
    """Dependency for predict and read endpoints: a no-op unless API keys are configured. The task is the
    route's `task` path parameter (None for routes of no one task, which any valid key may call); the key
    is kept in `request.state.api_key` for routes that filter by it (the task list)."""
    keys = request.app.state.svc.keys
    request.state.api_key = None
    if not keys.enabled:
        return
    token = _bearer(request)
    if token is None:
        raise _missing("API key")
    if _is_admin(request, token):
        return
    task = request.path_params.get("task")
    access, key = keys.check(token, task)
    if access is Access.UNKNOWN_KEY:
        raise HTTPException(401, "unknown API key", headers={"WWW-Authenticate": "Bearer"})
    if access is Access.FORBIDDEN:
        raise HTTPException(403, f"this API key may not call task '{task}'")
    request.state.api_key = key
