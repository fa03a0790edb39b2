"""`adapter-service store sync | gc | migrate` (registered by service.cli): seed a Redis registry from a local
store folder, collect unreferenced bucket objects, move Redis-held bundle bytes into the bucket.

Heavy imports happen inside the command, so `adapter-service --help` stays instant.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from service.cluster.s3_store import S3RedisAdapterStore
    from service.settings import ServiceSettings


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
    """Copy every task's versions (same numbers) and active pointers from a local store into Redis (the bytes
    into the bucket when ADAPTER_SERVICE_S3_ENDPOINT is set; the bucket is created if missing).

    Idempotent; running replicas pick the changes up through their change events. Exits 1 when a version
    exists in Redis with other bytes (left untouched) or Redis cannot be reached.
    """
    from service.bundles.store import LocalAdapterStore
    from service.cluster.redis_store import RedisAdapterStore
    from service.cluster.seed import seed_redis
    from service.errors import ServiceError
    from service.settings import ServiceSettings

    settings = ServiceSettings(redis_url=redis_url, redis_key_prefix=key_prefix, redis_timeout_s=timeout,
                               replica_id="store-sync")
    target = _bucket_store(settings, "sync") if settings.s3_endpoint else RedisAdapterStore.from_settings(settings)
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


def store_gc_command(
    grace_s: Annotated[float | None, typer.Option("--grace-s", help="leave objects younger than this "
                                                  "[default: ADAPTER_SERVICE_S3_GC_GRACE_S]", min=0)] = None,
):
    """Delete bucket objects no registry entry names (deleted tasks), leaving those younger than the grace period.

    Reads the service's settings (ADAPTER_SERVICE_REDIS_URL, ADAPTER_SERVICE_S3_*). Safe beside running
    replicas and uploads. Exits 1 when Redis or the bucket cannot be reached.
    """
    from service.cluster.gc import collect_garbage
    from service.errors import ServiceError
    from service.settings import ServiceSettings

    settings = ServiceSettings()
    store = _bucket_store(settings, "gc")
    try:
        report = collect_garbage(store, grace_s=settings.s3_gc_grace_s if grace_s is None else grace_s)
    except ServiceError as exc:
        typer.echo(f"store gc failed: {exc.message}", err=True)
        raise typer.Exit(1) from None
    finally:
        store.close()
    for key in report.deleted:
        typer.echo(f"deleted {key}")
    typer.echo(report.describe())


def store_migrate_command():
    """Move every version whose bundle bytes are still in Redis into the bucket, without downtime.

    First restart the replicas with ADAPTER_SERVICE_S3_* set (they then read both kinds and upload to the
    bucket); then run this with the same settings. Each version is copied, its checksum verified, and only
    then its registry entry switched to the object, atomically. Idempotent; exits 1 on a failure (run it
    again to resume).
    """
    from service.cluster.migrate import migrate_to_bucket
    from service.cluster.s3_store import MoveOutcome
    from service.errors import ServiceError
    from service.settings import ServiceSettings

    store = _bucket_store(ServiceSettings(), "migrate")
    try:
        counts = migrate_to_bucket(store, on_version=lambda t, v, o: typer.echo(f"{t} v{v}: {o.name.lower()}"))
    except ServiceError as exc:
        typer.echo(f"store migrate failed: {exc.message}", err=True)
        raise typer.Exit(1) from None
    finally:
        store.close()
    typer.echo(f"moved {counts[MoveOutcome.MOVED]} version(s) into {store.bucket.where}; "
               f"{counts[MoveOutcome.ALREADY]} were there already, {counts[MoveOutcome.GONE]} deleted meanwhile")


def _bucket_store(settings: ServiceSettings, command: str) -> S3RedisAdapterStore:
    """The Redis + bucket store of the settings, without a local blob cache (a one-off command reads each
    bundle once at most), its bucket created if missing. Exits 2 when no bucket is configured, 1 when it
    cannot be reached."""
    from service.cluster.s3_store import S3RedisAdapterStore
    from service.errors import ServiceError

    if not (settings.redis_url and settings.s3_endpoint):
        typer.echo("error: set ADAPTER_SERVICE_REDIS_URL and ADAPTER_SERVICE_S3_ENDPOINT (and the bucket's "
                   "credentials) as for the replicas", err=True)
        raise typer.Exit(2)
    store = S3RedisAdapterStore.from_settings(settings.model_copy(update={"blob_cache_bytes": 0}))
    try:
        store.bucket.ensure_bucket()
    except ServiceError as exc:
        store.close()
        typer.echo(f"store {command} failed: {exc.message}", err=True)
        raise typer.Exit(1) from None
    return store
