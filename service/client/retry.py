"""When and how long the client waits before trying a request again.

A 503 means the service refused the request without acting on it (overloaded, starting, stopping; an upload
refused with 503 was not stored), so every call may be retried on it, after the server's `Retry-After` when
it sent one, else after an exponential backoff. A connection that was never made (refused, connect or pool
timeout) sent nothing, so it is retried the same way. A connection that broke or timed out *after* the
request went out may have been acted on: only idempotent calls (predict, embed, reads, activate) retry then;
upload and delete do not. Jitter spreads clients that were refused together, so they do not return together.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime

import httpx

__all__ = ["RetryPolicy", "parse_retry_after", "retryable_error", "sent_nothing"]


@dataclass(frozen=True)
class RetryPolicy:
    """`max_retries` extra attempts at most (0: never retry). Without `Retry-After`, attempt n (0-based) waits
    `backoff * 2**n`; with it, the server's value. Either grows by a random fraction of at most `jitter`,
    and no single wait is longer than `max_wait` seconds."""

    max_retries: int = 3
    backoff: float = 0.5
    max_wait: float = 30.0
    jitter: float = 0.25
    rng: random.Random = field(default_factory=random.Random, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.max_retries < 0 or self.backoff < 0 or self.max_wait < 0 or self.jitter < 0:
            raise ValueError("max_retries, backoff, max_wait and jitter must not be negative")

    def wait(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number `attempt + 1` (attempt 0 is the first request)."""
        base = retry_after if retry_after is not None else self.backoff * 2.0 ** min(attempt, 32)
        return min(self.max_wait, base * (1.0 + self.rng.uniform(0.0, self.jitter)))


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """`Retry-After` in seconds: delta-seconds ("5") or an HTTP date; None when absent or unreadable."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = (when - (now or datetime.now(timezone.utc))).total_seconds()
    if seconds != seconds:  # NaN
        return None
    return max(0.0, seconds)


def sent_nothing(exc: httpx.TransportError) -> bool:
    """The request never left: the connection was refused or timed out before it was made."""
    return isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout))


def retryable_error(exc: httpx.TransportError, idempotent: bool) -> bool:
    """Whether a failed connection may be retried (see the module docstring)."""
    if sent_nothing(exc):
        return True
    return idempotent and isinstance(exc, (httpx.NetworkError, httpx.TimeoutException, httpx.RemoteProtocolError))
