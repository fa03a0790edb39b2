"""Move a Redis-only deployment's bundle bytes into the bucket, while it serves.

Before: replicas run with `ADAPTER_SERVICE_S3_*` set (a rolling restart; new uploads go to the bucket
from then on, and they read entries of both kinds). Then `adapter-service store migrate` visits every
version whose bytes are still inline in Redis: copies them to their content-addressed object, checks the
object's checksum, and switches the entry to the object in one script (`S3RedisAdapterStore.move_to_object`).
A reader sees the inline bytes before the switch and the object after it, never neither; nothing is
announced and the generation does not move, because no version's bytes change. Idempotent: a second run
finds nothing inline and moves nothing; an interrupted run resumes where it stopped.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from service.cluster.s3_store import MoveOutcome, S3RedisAdapterStore
from service.errors import TaskNotFound


def migrate_to_bucket(store: S3RedisAdapterStore, *, on_version: Callable[[str, int, MoveOutcome], None] | None = None,
                      ) -> Counter[MoveOutcome]:
    """Move every inline version of every task into the bucket; counts by outcome."""
    outcomes: Counter[MoveOutcome] = Counter()
    for task in store.list_tasks():
        try:
            versions = store.list_versions(task)
        except TaskNotFound:  # deleted while we went
            continue
        for version in versions:
            outcome = store.move_to_object(task, version)
            outcomes[outcome] += 1
            if on_version is not None:
                on_version(task, version, outcome)
    return outcomes
