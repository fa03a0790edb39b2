"""Predict over a JSON-lines file: one predict body per line, sent in batches, answered line by line.

Each line is a JSON object with the single-input fields of a predict body: `{"text"}`, `{"text", "text_pair"}`
or `{"question", "context"}`. Consecutive lines of the same shape are sent together as one list request
(`texts`, `texts` + `text_pairs`, `questions` + `contexts`) of at most `batch_size` inputs, so a file costs
a few requests instead of one per line, and the answers come back in input order. Blank lines are skipped.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

__all__ = ["Batch", "LineError", "batches", "count_inputs", "parse_line"]

# a line's fields -> the list fields of the request body they are batched into
_SHAPES: dict[frozenset[str], tuple[tuple[str, str], ...]] = {
    frozenset({"text"}): (("text", "texts"),),
    frozenset({"text", "text_pair"}): (("text", "texts"), ("text_pair", "text_pairs")),
    frozenset({"question", "context"}): (("question", "questions"), ("context", "contexts")),
}


class LineError(ValueError):
    """A line that is not a predict body; `line` is its 1-based number."""

    def __init__(self, line: int, message: str):
        super().__init__(f"line {line}: {message}")
        self.line = line


@dataclass
class Batch:
    """Consecutive input lines `first_line..last_line` (1-based, blank lines included in the span) sent as
    one request `body` with `size` inputs."""

    first_line: int
    last_line: int
    body: dict[str, list[str]]
    size: int


def parse_line(line: int, raw: str) -> dict[str, str]:
    """One line as a predict body with single-input fields, or LineError saying what is wrong."""
    try:
        value: Any = json.loads(raw)
    except ValueError as exc:
        raise LineError(line, f"not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise LineError(line, f"expected a JSON object, got {type(value).__name__}")
    if frozenset(value) not in _SHAPES:
        raise LineError(line, "a line holds {text}, {text, text_pair} or {question, context}; "
                        f"got {{{', '.join(sorted(value)) or 'nothing'}}}")
    for key, text in value.items():
        if not isinstance(text, str):
            raise LineError(line, f"'{key}' must be a string, got {type(text).__name__}")
    return value


def batches(lines: Iterable[str], batch_size: int) -> Iterator[Batch]:
    """Group the lines into requests (see the module docstring); raises LineError at the first bad line,
    after yielding the batches before it."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    shape: frozenset[str] | None = None
    current: Batch | None = None
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        body = parse_line(number, raw)
        if current is not None and (frozenset(body) != shape or current.size == batch_size):
            yield current
            current = None
        if current is None:
            shape = frozenset(body)
            current = Batch(number, number, {plural: [] for _, plural in _SHAPES[shape]}, 0)
        for single, plural in _SHAPES[frozenset(body)]:
            current.body[plural].append(body[single])
        current.last_line, current.size = number, current.size + 1
    if current is not None:
        yield current


def count_inputs(lines: Iterable[str]) -> int:
    """The number of non-blank lines (a progress bar's total)."""
    return sum(1 for raw in lines if raw.strip())
