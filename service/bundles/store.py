"""Versioned adapter store: the `AdapterStore` interface and its local-directory implementation.

Versions of a task are numbered 1, 2, 3, ... and never reused, not even after the task is deleted and
uploaded again, so `task@version` names one immutable bundle forever (caches key on it). Rollback and
roll-forward move the active pointer; they never copy bundles.

Local layout (root defaults to `adapters_store/`):

    <root>/.generation            registry-wide write counter (resync compares it)
    <root>/<task>/v<N>.safetensors  one immutable bundle per version
    <root>/<task>/ACTIVE          the active version number
    <root>/<task>/LAST_VERSION    the highest version ever allocated (survives delete)

Every file is written atomically (temp file in the same folder, fsync, rename, fsync folder), so a crash
mid-write never leaves a half file where a reader could see it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol, runtime_checkable

from service.bundles.codec import read_manifest
from service.bundles.manifest import Manifest, check_task_name
from service.errors import BundleInvalid, StoreUnavailable, TaskNotFound, VersionNotFound

_VERSION_FILE = re.compile(r"^v(\d+)\.safetensors$")
_STALE_TEMP_S = 3600.0


@dataclass(frozen=True)
class VersionInfo:
    """One stored version of a task (immutable)."""

    task: str
    version: int
    sha256: str
    size_bytes: int
    stored_at: datetime
    manifest: Manifest


@runtime_checkable
class AdapterStore(Protocol):
    """Where bundles live. Callers never care which implementation they talk to (local folder or Redis).

    All methods are blocking; async callers run them in a worker thread. Names are validated
    (InvalidTaskName), unknown names raise TaskNotFound / VersionNotFound, an unreachable backend
    raises StoreUnavailable.
    """

    def put(self, task: str, data: bytes, *, activate: bool = True) -> VersionInfo:
        """Store `data` (an already validated bundle for `task`) as the next version; optionally activate it."""

    def get_bytes(self, task: str, version: int) -> bytes: ...

    def get_info(self, task: str, version: int) -> VersionInfo: ...

    def list_tasks(self) -> list[str]:
        """Tasks that have at least one version, sorted."""

    def list_versions(self, task: str) -> list[int]:
        """Versions of `task`, ascending; TaskNotFound if it has none."""

    def get_active(self, task: str) -> int: ...

    def set_active(self, task: str, version: int) -> None: ...

    def delete_task(self, task: str) -> None:
        """Remove every version and the active pointer; version numbers stay reserved."""

    def generation(self) -> int:
        """A counter that grows with every write anywhere in the store (for cheap change detection)."""

    def ping(self) -> None:
        """Raise StoreUnavailable when the backend cannot be reached."""


def atomic_write_bytes(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Write `data` to `path` so that readers see either the old file or the whole new one; `durable`: on disk
    (file and folder fsynced) when this returns (a cache that verifies what it reads can skip that)."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if durable:
        _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalAdapterStore:
    """`AdapterStore` on a local folder. Safe across threads and across processes sharing the folder."""

    def __init__(self, root: Path | str):
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreUnavailable(f"cannot create adapter store at {self.root}: {exc}") from None
        self._thread_lock = threading.Lock()
        self._sha_cache: dict[tuple[str, int], str] = {}
        self._remove_stale_temp_files()

    # --- reads --------------------------------------------------------------------------------

    def get_bytes(self, task: str, version: int) -> bytes:
        try:
            return self._version_path(task, version).read_bytes()
        except FileNotFoundError:
            raise self._missing(task, version) from None

    def get_info(self, task: str, version: int) -> VersionInfo:
        path = self._version_path(task, version)
        try:
            data = path.read_bytes()
            stat = path.stat()
        except FileNotFoundError:
            raise self._missing(task, version) from None
        sha = self._sha_cache.get((task, version))
        if sha is None:
            sha = self._sha_cache[(task, version)] = hashlib.sha256(data).hexdigest()
        return VersionInfo(
            task=task,
            version=version,
            sha256=sha,
            size_bytes=len(data),
            stored_at=datetime.fromtimestamp(stat.st_mtime, timezone.utc),
            manifest=read_manifest(data),
        )

    def list_tasks(self) -> list[str]:
        tasks = []
        for child in sorted(self.root.iterdir()):
            if child.is_dir() and not child.name.startswith(".") and self._versions_in(child):
                tasks.append(child.name)
        return tasks

    def list_versions(self, task: str) -> list[int]:
        versions = self._versions_in(self._task_dir(task))
        if not versions:
            raise TaskNotFound(task)
        return versions

    def get_active(self, task: str) -> int:
        try:
            text = (self._task_dir(task) / "ACTIVE").read_text().strip()
        except FileNotFoundError:
            raise TaskNotFound(task) from None
        return int(text)

    def generation(self) -> int:
        return self._read_int(self.root / ".generation")

    def ping(self) -> None:
        if not os.access(self.root, os.R_OK | os.W_OK | os.X_OK):
            raise StoreUnavailable(f"adapter store folder {self.root} is not readable and writable")

    # --- writes -------------------------------------------------------------------------------

    def put(self, task: str, data: bytes, *, activate: bool = True) -> VersionInfo:
        check_task_name(task)
        manifest = read_manifest(data)
        if manifest.task != task:
            raise BundleInvalid("task_mismatch", f"bundle is for task '{manifest.task}', not '{task}'")
        with self._write_lock():
            folder = self._task_dir(task)
            folder.mkdir(exist_ok=True)
            version = max(self._read_int(folder / "LAST_VERSION"), *self._versions_in(folder), 0) + 1
            atomic_write_bytes(folder / "LAST_VERSION", f"{version}\n".encode())
            atomic_write_bytes(self._version_path(task, version), data)
            if activate:
                atomic_write_bytes(folder / "ACTIVE", f"{version}\n".encode())
            self._bump_generation()
        return self.get_info(task, version)

    def set_active(self, task: str, version: int) -> None:
        with self._write_lock():
            if not self._version_path(task, version).exists():
                raise self._missing(task, version)
            atomic_write_bytes(self._task_dir(task) / "ACTIVE", f"{version}\n".encode())
            self._bump_generation()

    def delete_task(self, task: str) -> None:
        with self._write_lock():
            folder = self._task_dir(task)
            versions = self._versions_in(folder)
            if not versions:
                raise TaskNotFound(task)
            with contextlib.suppress(FileNotFoundError):
                (folder / "ACTIVE").unlink()
            for v in versions:
                with contextlib.suppress(FileNotFoundError):
                    self._version_path(task, v).unlink()
                self._sha_cache.pop((task, v), None)
            _fsync_dir(folder)
            self._bump_generation()

    # --- helpers ------------------------------------------------------------------------------

    def _task_dir(self, task: str) -> Path:
        return self.root / check_task_name(task)

    def _version_path(self, task: str, version: int) -> Path:
        return self._task_dir(task) / f"v{int(version)}.safetensors"

    def _missing(self, task: str, version: int) -> Exception:
        return VersionNotFound(task, version) if self._versions_in(self._task_dir(task)) else TaskNotFound(task)

    @staticmethod
    def _versions_in(folder: Path) -> list[int]:
        try:
            names = os.listdir(folder)
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(int(m.group(1)) for n in names if (m := _VERSION_FILE.match(n)))

    @staticmethod
    def _read_int(path: Path) -> int:
        try:
            return int(path.read_text().strip() or 0)
        except FileNotFoundError:
            return 0

    def _bump_generation(self) -> None:
        path = self.root / ".generation"
        atomic_write_bytes(path, f"{self._read_int(path) + 1}\n".encode())

    @contextlib.contextmanager
    def _write_lock(self) -> Iterator[None]:
        """Serialise writers: threads of this process, then processes sharing the folder (flock)."""
        with self._thread_lock, open(self.root / ".lock", "a+b") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def _remove_stale_temp_files(self) -> None:
        """Temp files left by a crashed writer are invisible to readers; tidy the old ones away."""
        now = time.time()
        for tmp in self.root.glob("**/.*.tmp-*"):
            with contextlib.suppress(OSError):
                if now - tmp.stat().st_mtime > _STALE_TEMP_S:
                    tmp.unlink()
