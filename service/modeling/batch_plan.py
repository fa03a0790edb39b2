"""Batch planning, as pure functions: which rows go together and in what order.

`plan_batch` sorts one batch's rows by slot so that every task is one contiguous segment (LoRAX
`segments.py`), LoRA tasks last; `pack_batches` cuts a queue of rows into batches under a row and padded-token budget,
grouping rows of similar length to limit padding; `admit_rows` keeps out of a batch the rows whose tasks
would not fit the device cache beside what running batches hold (S-LoRA / vLLM `max_loras` admission);
`gather_pieces` cuts a packed batch's task segments into the pieces of a gathered `[k, L]` layout.
"""

from __future__ import annotations

from collections.abc import Collection, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

Key = TypeVar("Key", bound=Hashable)


@dataclass(frozen=True)
class Segment:
    """Rows [start, stop) of a sorted batch all use `slot`."""

    slot: int
    start: int
    stop: int


@dataclass(frozen=True)
class BatchPlan:
    order: tuple[int, ...]  # order[i] = index (in the caller's list) of the row placed at position i
    segments: tuple[Segment, ...]

    def inverse(self) -> tuple[int, ...]:
        """inverse[j] = position in the sorted batch of the caller's row j."""
        inv = [0] * len(self.order)
        for pos, row in enumerate(self.order):
            inv[row] = pos
        return tuple(inv)


def plan_batch(row_slots: Sequence[int], last: Collection[int] = ()) -> BatchPlan:
    """Stable sort of rows by slot, the rows of the slots in `last` after all others (LoRA tasks: their tokens
    then form one range, which LoRA's batched matmuls read alone), and the segment boundaries of the sorted batch."""
    order = tuple(sorted(range(len(row_slots)), key=lambda i: (row_slots[i] in last, row_slots[i])))
    segments: list[Segment] = []
    for pos, row in enumerate(order):
        slot = row_slots[row]
        if segments and segments[-1].slot == slot:
            segments[-1] = Segment(slot, segments[-1].start, pos + 1)
        else:
            segments.append(Segment(slot, pos, pos + 1))
    return BatchPlan(order, tuple(segments))


def pack_batches(lengths: Sequence[int], max_rows: int, max_tokens: int, *, padded: bool = True) -> list[list[int]]:
    """Cut rows (by their token lengths) into batches of at most `max_rows` rows and `max_tokens` tokens:
    padded tokens (rows x longest row), or with `padded=False` real tokens (the sum of lengths, for packed
    forwards). Rows are grouped by length; a row longer than `max_tokens` goes alone. Batches come back in
    the order of their earliest row, so the oldest waiting row goes first.
    """
    if max_rows < 1 or max_tokens < 1:
        raise ValueError("max_rows and max_tokens must be >= 1")
    by_length = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = total = 0
    for i in by_length:
        new_longest, new_total = max(longest, lengths[i]), total + lengths[i]
        tokens = (len(current) + 1) * new_longest if padded else new_total
        if current and (len(current) + 1 > max_rows or tokens > max_tokens):
            batches.append(current)
            current, new_longest, new_total = [], lengths[i], lengths[i]
        current.append(i)
        longest, total = new_longest, new_total
    if current:
        batches.append(current)
    return sorted(batches, key=min)


@dataclass(frozen=True)
class Admission:
    rows: tuple[int, ...]  # admitted rows (indices into the caller's list), in the caller's order
    refused: tuple[int, ...]  # rows left waiting: their task did not fit beside the ones admitted or held


def admit_rows(
    keys: Sequence[Key | None], costs: Sequence[int], held: Mapping[Key, int], *, slots: int,
    max_bytes: int,
) -> Admission:
    """The rows (oldest first) whose tasks fit the device cache: at most `slots` distinct tasks and
    `max_bytes` of their weights, counting the tasks `held` (task -> bytes) by batches already running.

    A row's `keys[i]` names its task version (None: no adapter, always admitted) and `costs[i]` what that
    task takes on the device. A held task costs nothing more; a task larger than the whole `max_bytes` is
    admitted (it can never fit: its load fails for its own rows, with the reason). The oldest row (row 0)
    goes first: when its task does not fit, nothing is admitted, so that it waits only for running batches
    to finish and no younger row can take the room it needs (no starvation of a rare task under a flood).
    """
    free_slots = slots - len(held)
    free_bytes = max_bytes - sum(held.values())
    admitted: set[Key] = set()
    rows: list[int] = []
    refused: list[int] = []
    for i, key in enumerate(keys):
        if key is None or key in held or key in admitted or costs[i] > max_bytes:
            rows.append(i)
        elif free_slots >= 1 and costs[i] <= free_bytes:
            admitted.add(key)
            free_slots -= 1
            free_bytes -= costs[i]
            rows.append(i)
        elif i == 0:
            return Admission((), tuple(range(len(keys))))
        else:
            refused.append(i)
    return Admission(tuple(rows), tuple(refused))


PIECE_COST = 32
"""What one more piece of a gathered `[k, L]` layout costs, counted in padded token places: gathering its
task's weights and one more matrix in each batched matmul (fitted on the CPU's bfloat16 gather path, where a
place costs ~1 us and a piece ~30 us; docs/benchmarks.md, session 11)."""


def round_up(n: int, multiple: int) -> int:
    """n rounded up to a multiple of `multiple` (how a gathered layout's k and L are rounded)."""
    return -(-n // multiple) * multiple


@dataclass(frozen=True)
class Piece:
    """Tokens [start, stop) of a packed batch, all of the task in `slot`: one matrix of a gathered layout."""

    slot: int
    start: int
    stop: int


def gather_pieces(segments: Sequence[Piece], *, piece_cost: int = PIECE_COST, step: int = 16,
                  round_pieces: int = 1, round_length: int = 1) -> list[Piece]:
    """Cut task segments (token ranges) into pieces of at most L tokens, the L that makes the gathered
    `[pieces, L]` layout cheapest: fewest padded places plus `piece_cost` places per piece, i.e. the least
    `k(L) * (L + piece_cost)` with `k(L)` = sum of ceil(n / L), each of k and L first rounded up to a multiple
    of `round_pieces` / `round_length` where the layout is (`SlotPool.routing_packed`'s `bucket_shapes`).
    Padding every segment to the longest wastes half the layout when lengths vary (a batch of 32 rows over 12
    tasks: 13 to 138 tokens a task); cutting too fine multiplies the pieces. Candidates: the longest segment,
    and multiples of `step` below it (a few distinct matmul shapes). Pieces of one segment come in token
    order, segments in the given order."""
    segments = [s for s in segments if s.stop > s.start]
    if not segments:
        return []
    lengths = [s.stop - s.start for s in segments]
    longest = max(lengths)

    def cost(L: int) -> tuple[int, int]:
        pieces = sum(-(-n // L) for n in lengths)
        # ties: the longer piece (fewer pieces)
        return round_up(pieces, round_pieces) * (round_up(L, round_length) + piece_cost), -L

    L = min({longest, *range(step, longest, step)}, key=cost)
    return [Piece(s.slot, a, min(a + L, s.stop)) for s in segments for a in range(s.start, s.stop, L)]
