"""Bearer-token auth: an admin token for management endpoints, an optional API key for predict.

Missing credentials -> 401 (with `WWW-Authenticate: Bearer`), wrong ones -> 403; comparison is
constant-time. The tokens themselves are never logged or returned (the generated admin token is logged
once, at start, by the app factory).
"""

from __future__ import annotations

import hmac

from fastapi import HTTPException, Request


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def _check(request: Request, expected: str, what: str) -> None:
    got = _bearer(request)
    if got is None:
        raise HTTPException(401, f"missing {what}: send 'Authorization: Bearer <token>'",
                            headers={"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(got.encode(), expected.encode()):
        raise HTTPException(403, f"invalid {what}")


async def require_admin(request: Request) -> None:
    """Dependency for management endpoints."""
    _check(request, request.app.state.svc.admin_token, "admin token")


async def require_api_key(request: Request) -> None:
    """Dependency for predict and read endpoints: a no-op unless an API key is configured."""
    key = request.app.state.svc.api_key
    if key is not None:
        _check(request, key, "API key")
