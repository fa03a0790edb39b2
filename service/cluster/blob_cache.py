"""A bounded on-disk cache of bundle bytes, per replica, between the object store and the host/device caches.

Why: with bundles in a bucket, a replica that restarts, or evicts a task from its memory caches, would
otherwise fetch the same bytes over the network again. Files are named by SHA-256 (content-addressed, so
an entry is never stale and needs no invalidation) and checked against that name on every read: a file
that does not match (a torn write, a bad disk) is deleted and reported as a miss, so the caller refetches.

Bounded by bytes, least recently used out first. Recency survives restarts through the files' mtimes
(touched on every hit); the index is rebuilt from the folder at start. Writes go to a temp file renamed into
place, so readers never see half a file; no fsync, because a lost or torn entry is only a miss. Several
processes may share a folder (each keeps its own index; a file another one evicted is a miss).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import threading
from collections import OrderedDict
from pathlib import Path

from service.bundles.store import atomic_write_bytes

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[0-9a-f]{64}$")


class DiskBlobCache:
    """`get(sha256)` -> bytes or None; `put(sha256, data)`. Thread-safe; every OS error is a miss, never a failure."""

    def __init__(self, folder: Path | str, max_bytes: int):
        self.folder = Path(folder)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, int] = OrderedDict()  # sha256 -> size, least recently used first
        self._bytes = 0
        self.hits = self.misses = self.corrupt = 0
        self.folder.mkdir(parents=True, exist_ok=True)
        self._load_index()

    @property
    def nbytes(self) -> int:
        return self._bytes

    def get(self, sha256: str) -> bytes | None:
        path = self._path(sha256)
        try:
            data = path.read_bytes()
        except OSError:
            with self._lock:
                self.misses += 1
                self._forget(sha256)
            return None
        if hashlib.sha256(data).hexdigest() != sha256:
            log.warning("blob cache: %s does not match its checksum; dropped", path)
            with self._lock:
                self.corrupt += 1
                self.misses += 1
                self._forget(sha256)
            with contextlib.suppress(OSError):
                path.unlink()
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # recency for the next start
        with self._lock:
            self.hits += 1
            if sha256 in self._entries:
                self._entries.move_to_end(sha256)
            else:
                self._add(sha256, len(data))
        return data

    def put(self, sha256: str, data: bytes) -> None:
        if not _NAME.match(sha256) or len(data) > self.max_bytes:
            return
        path = self._path(sha256)
        try:
            atomic_write_bytes(path, data, durable=False)  # what is read back is checked against its name
        except OSError as exc:
            log.warning("blob cache: could not write %s: %s", path, exc)
            return
        with self._lock:
            self._forget(sha256)
            self._add(sha256, len(data))

    def __contains__(self, sha256: str) -> bool:
        with self._lock:
            return sha256 in self._entries

    # --- helpers (lock held where they change the index) ------------------------------------------

    def _path(self, sha256: str) -> Path:
        if not _NAME.match(sha256):
            raise ValueError(f"not a sha256: {sha256!r}")
        return self.folder / sha256

    def _add(self, sha256: str, size: int) -> None:
        self._entries[sha256] = size
        self._bytes += size
        while self._bytes > self.max_bytes and self._entries:
            old, old_size = self._entries.popitem(last=False)
            self._bytes -= old_size
            with contextlib.suppress(OSError):
                (self.folder / old).unlink()

    def _forget(self, sha256: str) -> None:
        size = self._entries.pop(sha256, None)
        if size is not None:
            self._bytes -= size

    def _load_index(self) -> None:
        """Rebuild the index from the folder, oldest first; tidy temp files a crash left behind."""
        found = []
        for entry in os.scandir(self.folder):
            with contextlib.suppress(OSError):
                if _NAME.match(entry.name):
                    st = entry.stat()
                    found.append((st.st_mtime, entry.name, st.st_size))
                elif ".tmp-" in entry.name:
                    os.unlink(entry.path)
        with self._lock:
            for _, name, size in sorted(found):
                self._add(name, size)
