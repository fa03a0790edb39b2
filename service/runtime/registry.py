"""Which version of each task is live, kept in memory so request admission never waits on the store.

The registry is refreshed from the store at start, after this replica's own writes, and (scale-out) when
the cluster reports a change or a resync. A request reads the active version ONCE, at admission; the
version it got is the one that serves it, whatever happens to the pointer afterwards.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from service.bundles.manifest import Manifest, check_task_name
from service.bundles.store import AdapterStore
from service.errors import TaskNotFound, VersionNotFound

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskView:
    """A task as admission sees it: its active version and that version's manifest."""

    task: str
    version: int
    manifest: Manifest


class TaskRegistry:
    """task -> TaskView, thread-safe. `on_change(task, old, new)` fires when a task's active version moves
    or the task disappears (new is None), so the runtime can drop stale cache entries."""

    def __init__(self, store: AdapterStore, on_change: Callable[[str, TaskView | None, TaskView | None], None] | None = None):
        self.store = store
        self._views: dict[str, TaskView] = {}
        self._lock = threading.Lock()
        # One refresh at a time, reads and update together: two refreshes racing (an upload's own on an API
        # thread, a change event's on the sync thread) could otherwise store the OLDER read last, and no
        # later event would correct it.
        self._refresh_lock = threading.Lock()
        self._on_change = on_change

    def resolve(self, task: str) -> TaskView:
        """The live view of `task`; a task unknown here is looked up in the store once (an upload from
        another replica whose event has not arrived yet). Raises TaskNotFound / StoreUnavailable."""
        check_task_name(task)
        view = self._views.get(task)
        if view is not None:
            return view
        view = self.refresh(task)
        if view is None:
            raise TaskNotFound(task)
        return view

    def get(self, task: str) -> TaskView | None:
        """The live view if this replica knows the task (no store access)."""
        return self._views.get(task)

    def snapshot(self) -> dict[str, TaskView]:
        with self._lock:
            return dict(self._views)

    def refresh(self, task: str) -> TaskView | None:
        """Re-read one task from the store; returns its view, or None when it no longer exists."""
        with self._refresh_lock:
            try:
                version = self.store.get_active(task)
                view = TaskView(task, version, self.store.get_info(task, version).manifest)
            except (TaskNotFound, VersionNotFound):  # deleted (or deleted between the two reads)
                view = None
            self._set(task, view)
            return view

    def refresh_all(self) -> None:
        """Re-read every task (start-up and resync). Tasks gone from the store are dropped."""
        tasks = set(self.store.list_tasks())
        for task in tasks:
            self.refresh(task)
        for task in set(self.snapshot()) - tasks:
            self._set(task, None)

    def _set(self, task: str, view: TaskView | None) -> None:
        with self._lock:
            old = self._views.get(task)
            if view is None:
                self._views.pop(task, None)
            else:
                self._views[task] = view
        changed = (old is None) != (view is None) or (old is not None and view is not None and old.version != view.version)
        if changed:
            log.info("task %s: %s -> %s", task, f"v{old.version}" if old else "absent", f"v{view.version}" if view else "absent")
            if self._on_change is not None:
                self._on_change(task, old, view)
