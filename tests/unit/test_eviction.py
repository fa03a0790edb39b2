"""The device cache's eviction order (segmented LRU) is pure: table tests."""

from __future__ import annotations

import pytest

from service.runtime.eviction import SegmentedLru


def run(slots: int, ops: str, share: float = 0.8) -> SegmentedLru[str]:
    """Apply `ops`, space-separated: `+k` add (a load), `k` touch (a use), `-k` remove (an eviction)."""
    order: SegmentedLru[str] = SegmentedLru(slots, share)
    for op in ops.split():
        if op[0] == "+":
            order.add(op[1:])
        elif op[0] == "-":
            order.remove(op[1:])
        else:
            order.touch(op)
    return order


@pytest.mark.parametrize(
    "slots, ops, probation, protected, victims",
    [
        # loads only: probation in load order, evicted oldest first (an LRU)
        (4, "+a +b +c", "abc", "", "abc"),
        # a use moves a task to protected; victims come from probation first
        (4, "+a +b +c a", "bc", "a", "bca"),
        # a use in protected refreshes it there
        (5, "+a +b +c a b a", "c", "ba", "cba"),
        # protected holds int(0.8 x 5) = 4 at most: the oldest there goes back to probation, as its newest
        (5, "+a +b +c +d +e a b c d e", "a", "bcde", "abcde"),
        # touching a task that is not resident changes nothing
        (4, "+a x", "a", "", "a"),
        # a removed task is gone from either segment
        (4, "+a +b a -a -b", "", "", ""),
        # a reloaded task starts over in probation
        (4, "+a a -a +a", "a", "", "a"),
        # one slot: no protected segment, a plain LRU
        (1, "+a a", "a", "", "a"),
    ],
)
def test_segmented_lru_order(slots, ops, probation, protected, victims):
    order = run(slots, ops)
    assert order.segments() == (list(probation), list(protected))
    assert "".join(order.victims()) == victims
    assert len(order) == len(victims) and all(k in order for k in victims)


def test_tasks_used_once_do_not_push_out_tasks_used_again():
    """The point of the policy: after a, b, c are each used twice, a stream of one-off tasks only ever evicts
    one-off tasks (an LRU of 4 would have evicted a, b and c)."""
    order = run(4, "+a +b +c a b c")
    resident = {"a", "b", "c"}
    for k in "defgh":
        if len(resident) == 4:
            victim = next(iter(order.victims()))
            order.remove(victim)
            resident.discard(victim)
            assert victim not in "abc"
        order.add(k)
        resident.add(k)
    assert {"a", "b", "c"} <= resident


@pytest.mark.parametrize("slots, share", [(0, 0.8), (4, 1.0), (4, -0.1)])
def test_segmented_lru_rejects_bad_sizes(slots, share):
    with pytest.raises(ValueError):
        SegmentedLru(slots, share)
