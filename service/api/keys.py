"""Per-task API keys: which bearer keys may call which tasks, read from a file that is re-read when it changes.

The file (`ADAPTER_SERVICE_API_KEYS_FILE`) is JSON and holds only SHA-256 hashes of the keys, never the keys:

    {"keys": [{"name": "reviews-team", "sha256": "<hex digest of the key>", "tasks": ["sst2", "reviews-*"]}]}

`tasks` are shell-style globs (`fnmatch`, case-sensitive). A presented key is hashed and compared with every
stored hash in constant time (`hmac.compare_digest`, no early exit), so neither timing nor the file reveals a
key. `adapter-service keys add` makes a key, prints it once and stores its hash.

The file is checked for changes (modification time, size) at most once a second on use; a changed file that
is invalid is refused with an error in the log and the keys read before stay in force, so a bad edit never
opens or closes the service by accident.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import logging
import threading
import time
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

from service.errors import ConfigurationError

log = logging.getLogger(__name__)

RECHECK_S = 1.0


class Access(enum.Enum):
    ALLOWED = "allowed"
    UNKNOWN_KEY = "unknown_key"  # 401: not a key of this service
    FORBIDDEN = "forbidden"  # 403: a key, but not for this task


@dataclass(frozen=True)
class ApiKey:
    name: str
    sha256: bytes
    tasks: tuple[str, ...]

    def allows(self, task: str) -> bool:
        return any(fnmatchcase(task, pattern) for pattern in self.tasks)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def hash_key(key: str) -> str:
    """What a key file stores for `key`."""
    return _digest(key).hex()


def parse_keys(text: str, source: str) -> list[ApiKey]:
    """The keys of a key file's text; ConfigurationError naming `source` and the problem."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ConfigurationError(f"{source}: not JSON ({exc})") from None
    entries = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ConfigurationError(f'{source}: expected {{"keys": [...]}}')
    keys, names = [], set()
    for i, entry in enumerate(entries):
        where = f"{source}: keys[{i}]"
        if not isinstance(entry, dict) or set(entry) - {"name", "sha256", "tasks"}:
            raise ConfigurationError(f"{where}: expected an object with name, sha256 and tasks")
        name, digest, tasks = entry.get("name"), entry.get("sha256"), entry.get("tasks")
        if not isinstance(name, str) or not name or name in names:
            raise ConfigurationError(f"{where}: 'name' must be a non-empty string, unique in the file")
        if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ConfigurationError(f"{where}: 'sha256' must be 64 lowercase hex digits (the key's SHA-256)")
        if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) and t for t in tasks):
            raise ConfigurationError(f"{where}: 'tasks' must be a non-empty list of task names or globs")
        names.add(name)
        keys.append(ApiKey(name, bytes.fromhex(digest), tuple(tasks)))
    return keys


class KeyRing:
    """The keys in force: from the key file (re-read on change) plus, if configured, the single `api_key`
    that may call every task."""

    def __init__(self, path: Path | None, all_tasks_key: str | None = None):
        self.path = path
        self._extra = [ApiKey("api_key", _digest(all_tasks_key), ("*",))] if all_tasks_key else []
        self._keys: list[ApiKey] = []
        self._stamp: tuple[int, int] | None = None
        self._checked = 0.0
        self._lock = threading.Lock()
        if path is not None:
            self._load(first=True)

    @property
    def enabled(self) -> bool:
        return self.path is not None or bool(self._extra)

    def identify(self, token: str) -> ApiKey | None:
        """The key `token` is, or None; compares with every key's hash (constant time per key)."""
        self._maybe_reload()
        digest = _digest(token)
        found = None
        for key in self._keys + self._extra:
            if hmac.compare_digest(digest, key.sha256):
                found = key
        return found

    def check(self, token: str, task: str | None) -> tuple[Access, ApiKey | None]:
        key = self.identify(token)
        if key is None:
            return Access.UNKNOWN_KEY, None
        if task is not None and not key.allows(task):
            return Access.FORBIDDEN, key
        return Access.ALLOWED, key

    def _maybe_reload(self) -> None:
        if self.path is None or time.monotonic() - self._checked < RECHECK_S:
            return
        with self._lock:
            if time.monotonic() - self._checked >= RECHECK_S:
                self._load(first=False)

    def _load(self, *, first: bool) -> None:
        assert self.path is not None
        self._checked = time.monotonic()
        stamp = None
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp == self._stamp:
                return
            keys = parse_keys(self.path.read_text(), str(self.path))
        except (OSError, ConfigurationError) as exc:
            msg = exc.message if isinstance(exc, ConfigurationError) else f"{self.path}: {exc}"
            if first:
                raise ConfigurationError(f"API key file: {msg}") from None
            if stamp != self._stamp:  # once per change of the file, not once a second
                log.error("API key file not reloaded, the keys read before stay in force: %s", msg)
                self._stamp = stamp
            return
        self._keys, self._stamp = keys, stamp
        if not first:
            log.info("API key file reloaded: %d keys", len(keys))
