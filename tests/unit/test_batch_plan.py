"""Batch planning is pure: table tests."""

import pytest

from service.modeling.batch_plan import (
    Admission,
    Piece,
    Segment,
    admit_rows,
    gather_pieces,
    pack_batches,
    plan_batch,
)


@pytest.mark.parametrize(
    "slots, last, order, segments",
    [
        ([5, 1, 3, 1], {1}, (2, 0, 1, 3), (Segment(3, 0, 1), Segment(5, 1, 2), Segment(1, 2, 4))),
        ([5, 1, 3, 0, 1], {1, 5}, (3, 2, 1, 4, 0), (Segment(0, 0, 1), Segment(3, 1, 2), Segment(1, 2, 4),
                                                     Segment(5, 4, 5))),
        ([2, 2], {2}, (0, 1), (Segment(2, 0, 2),)),  # all of them last: as without
        ([2, 1], {9}, (1, 0), (Segment(1, 0, 1), Segment(2, 1, 2))),  # a slot not in the batch: as without
    ],
)
def test_plan_batch_puts_the_last_slots_after_the_others(slots, last, order, segments):
    """LoRA tasks' slots go last, so that their tokens are one range (`Routing.lora_span`)."""
    plan = plan_batch(slots, last=last)
    assert (plan.order, plan.segments) == (order, segments)


@pytest.mark.parametrize(
    "slots, order, segments",
    [
        ([], (), ()),
        ([3], (0,), (Segment(3, 0, 1),)),
        ([2, 2, 2], (0, 1, 2), (Segment(2, 0, 3),)),
        ([2, 1, 2, 1], (1, 3, 0, 2), (Segment(1, 0, 2), Segment(2, 2, 4))),
        ([0, 5, 0, 3], (0, 2, 3, 1), (Segment(0, 0, 2), Segment(3, 2, 3), Segment(5, 3, 4))),
        ([4, 3, 2, 1], (3, 2, 1, 0), (Segment(1, 0, 1), Segment(2, 1, 2), Segment(3, 2, 3), Segment(4, 3, 4))),
        # stable: rows of one slot keep their arrival order
        ([7, 1, 7, 1, 7], (1, 3, 0, 2, 4), (Segment(1, 0, 2), Segment(7, 2, 5))),
    ],
)
def test_plan_batch_sorts_by_slot_and_cuts_segments(slots, order, segments):
    plan = plan_batch(slots)
    assert plan.order == order
    assert plan.segments == segments
    inv = plan.inverse()
    assert all(plan.order[inv[j]] == j for j in range(len(slots)))
    for seg in plan.segments:  # each segment is one slot, and segments tile the batch
        assert {slots[plan.order[i]] for i in range(seg.start, seg.stop)} == {seg.slot}
    assert sum(s.stop - s.start for s in plan.segments) == len(slots)


@pytest.mark.parametrize(
    "lengths, max_rows, max_tokens, batches",
    [
        ([], 4, 100, []),
        ([5, 5, 5], 4, 100, [[0, 1, 2]]),
        ([5, 5, 5, 5, 5], 2, 100, [[0, 1], [2, 3], [4]]),
        # token budget: 3 rows x 10 tokens = 30 > 25, so cut after two rows
        ([10, 10, 10], 8, 25, [[0, 1], [2]]),
        # grouped by length: the two short rows go together, the two long ones together
        ([50, 3, 48, 4], 2, 1000, [[2, 0], [1, 3]]),
        # a row longer than the token budget goes alone rather than being dropped
        ([200, 5], 8, 100, [[0], [1]]),
        # batches come back in the order of their oldest row
        ([30, 30, 2, 2], 2, 1000, [[0, 1], [2, 3]]),
    ],
)
def test_pack_batches_respects_budgets(lengths, max_rows, max_tokens, batches):
    got = pack_batches(lengths, max_rows, max_tokens)
    assert got == batches
    assert sorted(i for b in got for i in b) == list(range(len(lengths)))
    for b in got:
        assert len(b) <= max_rows
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= max_tokens


@pytest.mark.parametrize(
    "lengths, max_rows, max_tokens, batches",
    [
        # real tokens: 50 + 3 + 4 = 57 fit 60, where padded (3 x 50 = 150) would not
        ([50, 3, 4], 8, 60, [[1, 2, 0]]),
        ([50, 3, 48, 4], 8, 60, [[0], [1, 3, 2]]),
        ([10, 10, 10], 8, 25, [[0, 1], [2]]),
        ([200, 5], 8, 100, [[0], [1]]),
    ],
)
def test_pack_batches_counts_real_tokens_for_packed_forwards(lengths, max_rows, max_tokens, batches):
    got = pack_batches(lengths, max_rows, max_tokens, padded=False)
    assert got == batches
    for b in got:
        assert len(b) == 1 or sum(lengths[i] for i in b) <= max_tokens


def test_pack_batches_rejects_empty_budget():
    with pytest.raises(ValueError):
        pack_batches([1], 0, 10)



@pytest.mark.parametrize(
    "lengths, piece_cost, piece_lengths",
    [
        ([], 32, []),
        ([5], 32, [5]),
        # alike lengths: padding to the longest costs nothing worth a cut
        ([40, 44, 48], 32, [40, 44, 48]),
        # one long task among short ones: cut it to the short ones' length (3 pieces of 32 + the short ones
        # cost 6 x (32 + 32) = 384 places; padding all to 96 costs 4 x (96 + 32) = 512)
        ([96, 20, 30, 32], 32, [32, 32, 32, 20, 30, 32]),
        # the same with pieces that cost more than the padding they save: no cut
        ([96, 20, 30, 32], 300, [96, 20, 30, 32]),
        # free pieces: the finest step
        ([40, 8], 0, [16, 16, 8, 8]),
        # a session's batch (32 rows over 12 tasks): cut at 64
        ([13, 18, 23, 26, 31, 49, 51, 51, 63, 66, 87, 138], 32,
         [13, 18, 23, 26, 31, 49, 51, 51, 63, 64, 2, 64, 23, 64, 64, 10]),
        # empty segments carry no tokens and give no piece
        ([0, 7], 32, [7]),
    ],
)
def test_gather_pieces_cuts_where_it_pads_less_than_it_costs(lengths, piece_cost, piece_lengths):
    check_pieces(lengths, gather_pieces(pieces_of(lengths), piece_cost=piece_cost), piece_lengths)


@pytest.mark.parametrize(
    "lengths, piece_lengths",
    [
        # rounded to k a multiple of 4 and L of 16, the cut of [96, 20, 30, 32] saves nothing (8 x (32 + 32)
        # = 4 x (96 + 32) = 512): not cut
        ([96, 20, 30, 32], [96, 20, 30, 32]),
        # 5 tasks padded to 4 more filler rows: cutting the long one costs no more rows (8 either way)
        ([96, 20, 30, 32, 20], [32, 32, 32, 20, 30, 32, 20]),
    ],
)
def test_gather_pieces_prices_the_rounded_layout(lengths, piece_lengths):
    check_pieces(lengths, gather_pieces(pieces_of(lengths), round_pieces=4, round_length=16), piece_lengths)


def pieces_of(lengths: list[int]) -> list[Piece]:
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    return [Piece(slot, a, a + n) for slot, (a, n) in enumerate(zip(starts, lengths), start=1)]


def check_pieces(lengths: list[int], pieces: list[Piece], piece_lengths: list[int]) -> None:
    segments = pieces_of(lengths)
    assert [p.stop - p.start for p in pieces] == piece_lengths
    # the pieces tile each segment in token order, one slot each
    for seg in segments:
        own = [p for p in pieces if p.slot == seg.slot]
        assert [(p.start, p.stop) for p in own] == sorted((p.start, p.stop) for p in own)
        assert sum(p.stop - p.start for p in own) == seg.stop - seg.start
        assert not own or (own[0].start, own[-1].stop) == (seg.start, seg.stop)


A, B, C, D = ("a", 1), ("b", 1), ("c", 1), ("d", 1)


@pytest.mark.parametrize(
    "keys, costs, held, slots, max_bytes, admitted, refused",
    [
        # everything fits
        ([A, B, A], [10, 10, 10], {}, 4, 100, (0, 1, 2), ()),
        # two slots: the third task waits, its later rows too; rows of admitted tasks keep coming
        ([A, B, C, A, C, B], [10] * 6, {}, 2, 100, (0, 1, 3, 5), (2, 4)),
        # a task held by a running batch costs no new slot
        ([A, B, C], [10] * 3, {A: 10}, 2, 100, (0, 1), (2,)),
        ([C, A, B], [10] * 3, {A: 10, B: 10}, 3, 100, (0, 1, 2), ()),
        # the oldest row's task does not fit beside the held ones: nothing is admitted (it goes first later)
        ([C, A, A], [10] * 3, {A: 10, B: 10}, 2, 100, (), (0, 1, 2)),
        # bytes bind before slots
        ([A, B, C], [40, 40, 40], {}, 8, 100, (0, 1), (2,)),
        ([A, B, C], [40, 70, 20], {}, 8, 100, (0, 2), (1,)),
        ([A, B], [40, 40], {C: 30}, 8, 100, (0,), (1,)),
        # rows without an adapter are always admitted
        ([None, A, None, B], [0, 10, 0, 10], {C: 10}, 2, 100, (0, 1, 2), (3,)),
        ([None, None], [0, 0], {A: 10, B: 10}, 2, 100, (0, 1), ()),
        # a task larger than the whole budget can never fit: admitted, so that its load fails with the reason
        ([D, A], [500, 10], {}, 1, 100, (0, 1), ()),
        ([], [], {}, 1, 100, (), ()),
    ],
)
def test_admit_rows_keeps_batches_inside_the_cache(keys, costs, held, slots, max_bytes, admitted, refused):
    got = admit_rows(keys, costs, held, slots=slots, max_bytes=max_bytes)
    assert got == Admission(admitted, refused)
    fitting = {keys[i] for i in got.rows if keys[i] is not None and costs[i] <= max_bytes}
    new = fitting - set(held)
    assert len(new) + len(held) <= slots or not new
    assert sum(costs[keys.index(k)] for k in new) + sum(held.values()) <= max_bytes or not new
