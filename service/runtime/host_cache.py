"""Host-memory LRU of decoded, validated bundles, between the store and the device cache.

The device cache holds few tasks when its budget is small; a task evicted there and needed again a moment
later would otherwise be read from the store and decoded and validated again (file read, safetensors
parse, every tensor's shape and NaN/Inf check) on the forward worker's time. Keys are `task@version`, which
are immutable (a new upload is a new version), so an entry is never stale; it is bounded by the bytes of
its tensors, least recently used first out.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

from service.bundles.codec import Bundle

Key = tuple[str, int]


class HostBundleCache:
    """`get(task, version)`: the decoded bundle, from memory or through `load` (then kept). Thread-safe."""

    def __init__(self, load: Callable[[str, int], Bundle], max_bytes: int):
        self._load, self.max_bytes = load, max_bytes
        self._entries: OrderedDict[Key, tuple[Bundle, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, task: str, version: int) -> Bundle:
        key = (task, version)
        with self._lock:
            got = self._entries.get(key)
            if got is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return got[0]
            self.misses += 1
        bundle = self._load(task, version)  # outside the lock: loads of different keys run in parallel
        self.put(key, bundle)
        return bundle

    def put(self, key: Key, bundle: Bundle) -> None:
        nbytes = sum(t.numel() * t.element_size() for t in bundle.tensors.values())
        if nbytes > self.max_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._entries[key] = (bundle, nbytes)
            self._bytes += nbytes
            while self._bytes > self.max_bytes:
                _, (_, dropped) = self._entries.popitem(last=False)
                self._bytes -= dropped

    def forget(self, task: str, keep_version: int | None = None) -> None:
        """Drop every version of `task` but `keep_version` (deleted or replaced: the others will not be
        asked for again unless rolled back to, which loads them from the store)."""
        with self._lock:
            for key in [k for k in self._entries if k[0] == task and k[1] != keep_version]:
                self._bytes -= self._entries.pop(key)[1]

    @property
    def resident_bytes(self) -> int:
        return self._bytes
