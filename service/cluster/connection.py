"""Redis connections for the cluster layer: one way to open a client, one way to turn Redis failures into
`StoreUnavailable`.

Clients are blocking redis-py clients on a `BlockingConnectionPool`: the app calls the store from worker
threads, and a full pool makes a caller wait (up to the timeout) instead of failing at once. Commands are
retried once, quickly, which covers the common case of a pooled socket that died with a Redis restart;
more retries would only delay the 503 a caller should get while Redis is down.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from service.errors import StoreUnavailable


def connect(url: str, *, timeout_s: float = 2.0, max_connections: int = 32, retries: int = 1) -> redis.Redis:
    """A client for `url` (redis:// or rediss://); connects lazily, so Redis may be down at this point."""
    pool = redis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout_s,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(ExponentialWithJitterBackoff(cap=0.1, base=0.01), retries),
        health_check_interval=30,
    )
    return redis.Redis(connection_pool=pool)


@contextlib.contextmanager
def redis_errors() -> Iterator[None]:
    """Raise `StoreUnavailable` for any Redis failure inside the block.

    Connection problems (refused, timed out, still loading its data, pool exhausted) read "unreachable";
    errors Redis answers with (read-only replica, out of memory, persistence failing: MISCONF) read
    "refused", since the server is there but will not take the request.
    """
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise StoreUnavailable(f"adapter store (Redis) unreachable: {exc}") from exc
    except redis.RedisError as exc:
        raise StoreUnavailable(f"adapter store (Redis) refused the request: {exc}") from exc


def default_replica_id() -> str:
    """`<hostname>-<pid>`: unique per process on a host, readable in logs."""
    return f"{socket.gethostname()}-{os.getpid()}"
