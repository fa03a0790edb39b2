"""What the client raises: one exception per HTTP status the service answers, each carrying the server's
own message.

Every error answer of the service is `{"detail": "<what is wrong>"}`; the exception's message *is* that
detail (no client-side rewording), so what a user reads is what the server logged and documented. Callers
catch by meaning (`NotFound`, `Unavailable`, ...) or all at once (`ApiError` for any error status,
`AdapterServiceError` for anything, a failed connection included).
"""

from __future__ import annotations

import json

import httpx

__all__ = [
    "AdapterServiceError", "ApiError", "BadResponse", "Conflict", "ConnectionFailed", "Forbidden", "Invalid",
    "NotFound", "TooLarge", "Unauthorized", "Unavailable", "error_from_response",
]


class AdapterServiceError(Exception):
    """Base class of every error this client raises."""


class ConnectionFailed(AdapterServiceError):
    """No answer: the connection could not be made, broke, or timed out (after any retries allowed)."""

    def __init__(self, message: str, *, method: str, url: str):
        super().__init__(message)
        self.method, self.url = method, url


class ApiError(AdapterServiceError):
    """The service answered with an error status. `detail` is its message, `status` the HTTP status."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status={self.status}, detail={self.detail!r})"


class Invalid(ApiError):
    """400 / 415 / 422: the request does not fit (malformed body, a shape the task's head does not take,
    an invalid bundle)."""


class Unauthorized(ApiError):
    """401: a credential is missing."""


class Forbidden(ApiError):
    """403: the credential is wrong, or not allowed this task."""


class NotFound(ApiError):
    """404: unknown task or version."""


class Conflict(ApiError):
    """409: the request conflicts with the store's current state."""


class TooLarge(ApiError):
    """413: a text over the character limit, or a bundle over the upload limit."""


class Unavailable(ApiError):
    """503: overloaded, starting or stopping; `retry_after` is the server's `Retry-After` in seconds (or
    None). Raised only once retries are used up (see `RetryPolicy`)."""

    def __init__(self, status: int, detail: str, retry_after: float | None = None):
        super().__init__(status, detail)
        self.retry_after = retry_after


class BadResponse(ApiError):
    """The service answered, but not with what this client understands (a proxy's HTML page, a body that
    does not match the response model)."""


_BY_STATUS: dict[int, type[ApiError]] = {
    400: Invalid, 401: Unauthorized, 403: Forbidden, 404: NotFound, 409: Conflict, 413: TooLarge,
    415: Invalid, 422: Invalid,
}


def detail_of(response: httpx.Response) -> str:
    """The server's message: `detail` of a JSON error body; else the body's text (or the reason phrase)."""
    try:
        body = response.json()
    except (ValueError, UnicodeDecodeError):
        body = None
    if isinstance(body, dict) and "detail" in body:
        detail = body["detail"]
        return detail if isinstance(detail, str) else json.dumps(detail)
    text = response.text.strip()
    return text[:500] if text else response.reason_phrase or f"HTTP {response.status_code}"


def error_from_response(response: httpx.Response, retry_after: float | None = None) -> ApiError:
    """The exception for an error answer (status >= 400)."""
    status, detail = response.status_code, detail_of(response)
    if status == 503:
        return Unavailable(status, detail, retry_after)
    return _BY_STATUS.get(status, ApiError)(status, detail)
