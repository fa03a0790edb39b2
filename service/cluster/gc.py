"""Garbage collection of bucket objects that no registry entry names any more.

Deleting a task removes its registry entries at once (its predictions answer 404 from then on) but leaves
its objects: the delete stays one Redis transaction, and an object shared by several entries (identical
bytes uploaded again) is removed only when the last of them goes. This pass lists the bucket and deletes
what is neither named by the registry nor reserved by a writer, and never anything younger than the grace
period: each deletion is claimed through `ObjectRefs`, so it cannot race an upload of the same bytes.

Run it from anywhere that reaches Redis and the bucket (`adapter-service store gc`, a CronJob); it is
idempotent and safe beside running replicas and uploads.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone

from service.cluster.object_refs import CLAIM_S
from service.cluster.s3_store import S3RedisAdapterStore

log = logging.getLogger(__name__)

CLAIM_MARGIN_S = 10.0
"""How much longer than the bucket's longest call (`S3Bucket.longest_call_s`) a collector holds its claim."""


@dataclass
class GcReport:
    deleted: list[str] = field(default_factory=list)
    referenced: int = 0  # named by the registry (or reserved by a writer): kept
    young: int = 0  # younger than the grace period: kept
    freed_bytes: int = 0

    def describe(self) -> str:
        return (f"deleted {len(self.deleted)} object(s) ({self.freed_bytes} bytes); kept {self.referenced} "
                f"referenced, {self.young} younger than the grace period")


def collect_garbage(store: S3RedisAdapterStore, *, grace_s: float, now: datetime | None = None) -> GcReport:
    """Delete the store's unreferenced objects older than `grace_s`; StoreUnavailable if Redis or the bucket fail."""
    report = GcReport()
    now = now or datetime.now(timezone.utc)
    # each claim outlasts the longest a delete can take, so no writer waiting on it writes before the delete ends
    hold_s = max(CLAIM_S, store.bucket.longest_call_s + CLAIM_MARGIN_S)
    store.refs.purge_expired()
    named = store.refs.referenced()  # a first filter; the claim below is what decides
    for obj in store.bucket.list():
        if obj.key in named:
            report.referenced += 1
        elif (now - obj.last_modified).total_seconds() < grace_s:
            report.young += 1
        elif not store.refs.claim(obj.key, hold_s=hold_s):
            report.referenced += 1
        else:
            try:
                store.bucket.delete(obj.key)
                if not store.refs.holds_claim(obj.key):  # cannot happen while hold_s bounds the delete
                    log.error("gc: the claim on %s lapsed before its delete returned; an upload of the same bytes "
                              "in that moment may have lost its object", obj.key)
            finally:
                store.refs.release(obj.key)
            report.deleted.append(obj.key)
            report.freed_bytes += obj.size
            log.info("gc: deleted %s (%d bytes)", obj.key, obj.size)
    return report
