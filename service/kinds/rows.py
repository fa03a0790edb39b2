"""What a tokenised input row is: the unit every kind encodes, trains on and post-processes."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EncodedRow:
    """One tokenised input. Offsets are character spans in `text` (sequence 0) or `text_pair` (sequence 1)."""

    input_ids: tuple[int, ...]
    token_type_ids: tuple[int, ...] | None
    offsets: tuple[tuple[int, int], ...]
    sequence_ids: tuple[int | None, ...]
    word_ids: tuple[int | None, ...]
    truncated: bool
    text: str  # the text, or the question for QA
    text_pair: str | None = None  # the second text, or the context for QA

    def __len__(self) -> int:
        return len(self.input_ids)
