"""What the three sequence-level kinds share: a text (optionally with a second text) per row, read from
tables, one pooled prediction per row."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import ClassVar, cast

from service.kinds.base import TaskKind
from service.kinds.examples import Example, TextExample


def text_examples(examples: Sequence[Example]) -> Sequence[TextExample]:
    """The examples of a sequence-level kind (it asked the readers for TextExamples)."""
    return cast("Sequence[TextExample]", examples)


def natural_key(label: str) -> tuple[int, float, str]:
    """Sort key: numbers numerically, before names."""
    return (0, float(label), label) if re.fullmatch(r"-?\d+(\.\d+)?", label) else (1, 0.0, label)


class SequenceKind(TaskKind):
    sequence_level: ClassVar[bool] = True

    def serving_inputs(self, examples: Sequence[Example]) -> tuple[list[str], list[str] | None]:
        rows = text_examples(examples)
        pairs = [e.pair for e in rows]
        has_pairs = any(p is not None for p in pairs)
        if has_pairs and any(p is None for p in pairs):
            raise ValueError("some rows have a second text and some do not")
        # cast: with has_pairs, every row has its second text (checked just above)
        return [e.text for e in rows], cast("list[str]", pairs) if has_pairs else None
