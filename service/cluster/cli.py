"""`adapter-service store sync`: seed a Redis registry from a local store folder (registered by service.cli).

Heavy imports happen inside the command, so `adapter-service --help` stays instant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def store_sync_command(
    src: Annotated[Path, typer.Argument(help="local adapter store folder (e.g. adapters_store/)", exists=True,
                                        file_okay=False, dir_okay=True)],
    redis_url: Annotated[str, typer.Option("--redis-url", envvar="ADAPTER_SERVICE_REDIS_URL",
                                           help="target Redis [env ADAPTER_SERVICE_REDIS_URL]")],
    key_prefix: Annotated[str, typer.Option(envvar="ADAPTER_SERVICE_REDIS_KEY_PREFIX",
                                            help="key prefix of the deployment")] = "adapter-service:",
    overwrite_active: Annotated[bool, typer.Option(help="also move active pointers the cluster has moved "
                                                        "since (default: keep them)")] = False,
    timeout: Annotated[float, typer.Option(help="Redis socket timeout, seconds")] = 10.0,
):
    """Copy every task's versions (same numbers) and active pointers from a local store into Redis.

    Idempotent; running replicas pick the changes up through their change events. Exits 1 when a version
    exists in Redis with other bytes (left untouched) or Redis cannot be reached.
    """
    from service.bundles.store import LocalAdapterStore
    from service.cluster.redis_store import RedisAdapterStore
    from service.cluster.seed import seed_redis
    from service.errors import ServiceError

    target = RedisAdapterStore(redis_url, key_prefix=key_prefix, timeout_s=timeout, replica_id="store-sync")
    try:
        reports = seed_redis(LocalAdapterStore(src), target, overwrite_active=overwrite_active)
    except ServiceError as exc:
        typer.echo(f"store sync failed: {exc.message}", err=True)
        raise typer.Exit(1) from None
    finally:
        target.close()
    for report in reports:
        typer.echo(report.describe())
    conflicts = [r.task for r in reports if not r.ok]
    typer.echo(f"{len(reports)} task(s) synced from {src} to Redis (prefix {key_prefix!r})"
               + (f"; conflicts in: {', '.join(conflicts)}" if conflicts else ""))
    if conflicts:
        raise typer.Exit(1)
