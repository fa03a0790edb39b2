"""Seed a Redis store from another store (a local `adapters_store/` folder): every task's versions under
the same numbers, then the active pointers. Idempotent: a second run changes nothing.

Safe to re-run against a live cluster: a version already in Redis with other bytes is a conflict and is
left alone (`task@version` names one bundle forever), a number Redis used before and deleted is never
reused, and an active pointer the cluster has moved elsewhere is kept unless `overwrite_active` is given.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from service.bundles.store import AdapterStore
from service.cluster.redis_store import ImportOutcome, RedisAdapterStore
from service.errors import TaskNotFound


class ActiveAction(str, Enum):
    SET = "set"  # Redis now points where the source does
    ALREADY = "already"  # it already did
    KEPT = "kept"  # Redis points elsewhere (the cluster moved on) and overwrite_active was not given
    UNAVAILABLE = "unavailable"  # the source's active version did not make it into Redis (conflict, reserved)
    NONE = "none"  # the source has no active version for this task


@dataclass
class TaskSeedReport:
    task: str
    versions: dict[ImportOutcome, list[int]] = field(default_factory=dict)
    active: int | None = None  # the source's active version
    target_active: int | None = None  # Redis's active version after the run
    action: ActiveAction = ActiveAction.NONE

    @property
    def ok(self) -> bool:
        return not self.versions.get(ImportOutcome.CONFLICT)

    def describe(self) -> str:
        words = {ImportOutcome.WRITTEN: "copied", ImportOutcome.UNCHANGED: "unchanged",
                 ImportOutcome.CONFLICT: "CONFLICT (other bytes in Redis)",
                 ImportOutcome.RESERVED: "skipped (number used before in Redis)"}
        parts = [f"{word} " + " ".join(f"v{v}" for v in self.versions[o]) for o, word in words.items()
                 if self.versions.get(o)]
        if self.action is ActiveAction.NONE:
            active = "no active version"
        elif self.action is ActiveAction.KEPT:
            active = f"active kept at v{self.target_active} (source: v{self.active}; --overwrite-active to change)"
        elif self.action is ActiveAction.UNAVAILABLE:
            active = f"active v{self.active} not copied"
        else:
            active = f"active v{self.active} ({self.action.value})"
        return f"{self.task}: {', '.join(parts)}; {active}"


def seed_redis(source: AdapterStore, target: RedisAdapterStore, *, overwrite_active: bool = False) -> list[TaskSeedReport]:
    """Copy every task of `source` into `target`; one report per task, in task order."""
    reports = []
    for task in source.list_tasks():
        report = TaskSeedReport(task)
        for version in source.list_versions(task):
            outcome = target.import_version(task, version, source.get_bytes(task, version))
            report.versions.setdefault(outcome, []).append(version)
        report.active = _active(source, task)
        report.target_active = _active(target, task)
        if report.active is not None:
            _sync_pointer(report, target, overwrite_active)
        reports.append(report)
    return reports


def _sync_pointer(report: TaskSeedReport, target: RedisAdapterStore, overwrite_active: bool) -> None:
    landed = report.versions.get(ImportOutcome.WRITTEN, []) + report.versions.get(ImportOutcome.UNCHANGED, [])
    if report.target_active == report.active:
        report.action = ActiveAction.ALREADY
    elif report.active not in landed:
        report.action = ActiveAction.UNAVAILABLE
    elif report.target_active is not None and not overwrite_active:
        report.action = ActiveAction.KEPT
    else:
        target.set_active(report.task, report.active)
        report.target_active, report.action = report.active, ActiveAction.SET


def _active(store: AdapterStore, task: str) -> int | None:
    try:
        return store.get_active(task)
    except TaskNotFound:
        return None
