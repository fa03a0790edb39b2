"""The device cache's eviction order: a segmented LRU (SLRU), pure and lock-free (the cache holds its lock).

A plain LRU lets every one-off task push out a task that is used all the time: under skewed traffic over
many tasks (Zipf over thousands, the long tail of a multi-tenant service) most misses are tasks seen once,
and each of them evicts the least recently used resident task, which is often a popular one that comes
straight back as another miss. A segmented LRU (Karedla, Love & Wherry 1994; the policy of memcached's and
many CDN caches) keeps two LRU lists:

- probation: where a newly loaded task enters;
- protected: where a task moves when it is used again while resident (at most `protected_share` of the
  slots; when it overflows, its least recently used task goes back to probation, as the newest there).

Victims come from probation first (oldest first), then from protected (oldest first). A task used once is
gone after the probation segment turns over; tasks used again stay, until they stop being used. With one
task or a working set that fits, it behaves as an LRU. Miss rates measured on the scale bench's traffic are
in docs/benchmarks.md (session 11).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)

PROTECTED_SHARE = 0.8
"""Share of the slots the protected segment may hold (the rest is probation's, at least one slot)."""


class SegmentedLru(Generic[K]):
    """Eviction order of at most `slots` resident keys. `add` a loaded key, `touch` it on every later use,
    `remove` it when it leaves; `victims()` lists resident keys in the order to evict them."""

    def __init__(self, slots: int, protected_share: float = PROTECTED_SHARE):
        if slots < 1 or not 0 <= protected_share < 1:
            raise ValueError("slots must be >= 1 and protected_share in [0, 1)")
        self.protected_slots = min(int(slots * protected_share), slots - 1)
        self._probation: OrderedDict[K, None] = OrderedDict()  # oldest first
        self._protected: OrderedDict[K, None] = OrderedDict()  # oldest first

    def __contains__(self, key: object) -> bool:
        return key in self._probation or key in self._protected

    def __len__(self) -> int:
        return len(self._probation) + len(self._protected)

    def add(self, key: K) -> None:
        """A key just loaded: the newest in probation."""
        self.remove(key)
        self._probation[key] = None

    def touch(self, key: K) -> None:
        """A resident key used again: the newest in protected (the oldest there moves back to probation when
        protected is full). A key not resident is ignored."""
        if key in self._protected:
            self._protected.move_to_end(key)
            return
        if key not in self._probation:
            return
        del self._probation[key]
        self._protected[key] = None
        while len(self._protected) > self.protected_slots:
            demoted, _ = self._protected.popitem(last=False)
            self._probation[demoted] = None

    def remove(self, key: K) -> None:
        self._probation.pop(key, None)
        self._protected.pop(key, None)

    def victims(self) -> Iterator[K]:
        """Resident keys in eviction order: probation oldest first, then protected oldest first (a snapshot:
        the caller may remove keys while iterating)."""
        yield from list(self._probation)
        yield from list(self._protected)

    def segments(self) -> tuple[list[K], list[K]]:
        """(probation, protected), each oldest first (for tests and introspection)."""
        return list(self._probation), list(self._protected)
