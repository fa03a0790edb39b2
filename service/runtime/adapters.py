"""Managing tasks while the service runs: upload, activate (rollback / roll forward), delete, describe.

Every write follows the same order: validate fully (an upload also gets a smoke forward through the
serving path) -> write the store -> refresh this replica's registry. Other replicas learn of the write
from the store itself (the Redis store publishes each write once it is durable). A refused upload never
reaches the store, so the store and the live tasks stay exactly as they were.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from service.bundles.archive import read_adapter_archive
from service.bundles.manifest import check_task_name
from service.bundles.store import AdapterStore, VersionInfo
from service.errors import BundleInvalid, CacheFull, InvalidTaskName, StoreUnavailable, TaskNotFound
from service.runtime.engine import Engine
from service.runtime.imports import import_folder
from service.runtime.registry import TaskRegistry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskSummary:
    task: str
    active_version: int
    versions: list[int]
    active: VersionInfo
    resident_versions: list[int]


class AdapterManager:
    """Blocking management operations (the API runs them in worker threads)."""

    def __init__(self, store: AdapterStore, engine: Engine, registry: TaskRegistry):
        self.store, self.engine, self.registry = store, engine, registry

    def upload(self, data: bytes) -> VersionInfo:
        """Validate, smoke-test, store and activate a bundle; returns the stored version."""
        bundle = self.engine.validate_bundle(data)
        task = bundle.manifest.task
        info = self.store.put(task, data, activate=True)
        self.engine.host_cache.put((task, info.version), bundle)  # its next load skips the store and validation
        try:
            self.engine.warm(task, info.version, bundle)  # the next request finds it resident
        except CacheFull:  # every slot in use right now: it loads with its first request
            log.debug("not pre-loaded (no free slot): %s@%d", task, info.version)
        except Exception:  # warming is an optimisation; the version is stored and will load on demand
            log.warning("could not pre-load %s@%d", task, info.version, exc_info=True)
        self._refresh_after_write(task)
        log.info("uploaded %s@%d (%d bytes, sha256 %s)", task, info.version, info.size_bytes, info.sha256[:12])
        return info

    def upload_archive(self, data: bytes, task: str, labels: list[str] | None, max_bytes: int) -> VersionInfo:
        """An adapter folder trained elsewhere (PEFT LoRA, AdapterHub), uploaded as a zip/tar archive: converted against
        the running backbone, then validated, smoke-tested, stored and activated like a bundle."""
        try:
            check_task_name(task)
        except InvalidTaskName as exc:  # a form field, not a path: the upload is invalid (422), no task is missing
            raise BundleInvalid("bad_task_name", str(exc)) from None
        files = read_adapter_archive(data, max_bytes=max_bytes)
        pickled = sorted(name for name in files if name.endswith((".bin", ".pt", ".pth", ".pkl")))
        if pickled:
            raise BundleInvalid("pickled_weights", f"{', '.join(pickled)}: pickles are never loaded over HTTP; save "
                                "the adapter as safetensors (PEFT's default; AdapterHub: use_safetensors=True), or "
                                "import it with the CLI")
        return self.upload(import_folder(files, task, self.engine.backbone, labels))

    def activate(self, task: str, version: int) -> VersionInfo:
        """Point `task` at an existing `version` (rollback or roll forward)."""
        check_task_name(task)
        self.store.set_active(task, version)
        self._refresh_after_write(task)
        return self.store.get_info(task, version)

    def delete(self, task: str) -> None:
        """Remove every version of `task`; its requests get 404 from now on."""
        check_task_name(task)
        self.store.delete_task(task)
        self._refresh_after_write(task)

    def summaries(self) -> list[TaskSummary]:
        return [self.summary(task) for task in self.store.list_tasks()]

    def summary(self, task: str) -> TaskSummary:
        check_task_name(task)
        versions = self.store.list_versions(task)
        active = self.store.get_active(task)
        resident = sorted(e.version for e in self.engine.cache.resident() if e.task == task and e.version > 0)
        return TaskSummary(task, active, versions, self.store.get_info(task, active), resident)

    def versions(self, task: str) -> list[VersionInfo]:
        return [self.store.get_info(task, v) for v in self.store.list_versions(task)]

    def is_active(self, task: str, version: int) -> bool:
        """Whether `version` is `task`'s active version now (another write may have moved the pointer since
        this replica's own). Never raises: an upload already durable must still be acknowledged, so with the
        store unreachable it answers from this replica's registry."""
        try:
            return self.store.get_active(task) == version
        except TaskNotFound:  # deleted since
            return False
        except StoreUnavailable:
            view = self.registry.get(task)
            return view is not None and view.version == version

    def _refresh_after_write(self, task: str) -> None:
        """The write is durable once the store returned: never turn it into an error (a client would retry
        and create a second version). If the store just went away, the resync after it returns catches up."""
        try:
            self.registry.refresh(task)
        except StoreUnavailable as exc:
            log.warning("%s was written, but refreshing this replica's view failed (%s); the next resync will",
                        task, exc.message)
