"""Labelled examples as the dataset readers make them: one dataclass per input form.

Sequence-level kinds read `TextExample`s (each kind sets its own target field), token classification reads
`TokenExample`s, extractive QA `QAExample`s; the kind that asked for them knows which they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TextExample:
    """One row for a sequence-level head: a text, an optional second text, and its target."""

    text: str
    pair: str | None = None
    label: str | None = None  # classification
    labels: tuple[str, ...] | None = None  # multilabel
    score: float | None = None  # regression
    line: int = 0


@dataclass(frozen=True)
class TokenExample:
    """One sentence for token classification: words and their BIO tags."""

    tokens: tuple[str, ...]
    tags: tuple[str, ...]
    line: int = 0

    @property
    def text(self) -> str:
        """What is sent to the service: the words joined by single spaces."""
        return " ".join(self.tokens)


@dataclass(frozen=True)
class QAExample:
    """One extractive question. `answers` are (text, char start) pairs; any of them counts as right."""

    id: str
    title: str
    question: str
    context: str
    answers: tuple[tuple[str, int], ...] = field(default_factory=tuple)


Example = TextExample | TokenExample | QAExample
