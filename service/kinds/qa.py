"""Extractive question answering: start/end logits per context token, the best span as the answer;
SQuAD v1.1 exact match and F1."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F

from service.kinds import metrics as M
from service.kinds.base import Targets, TaskKind
from service.kinds.examples import Example, QAExample
from service.kinds.heads import TokenHead
from service.kinds.rows import EncodedRow


class QuestionAnsweringHead(TokenHead):
    @classmethod
    def output_width(cls, labels: list[str]) -> int:
        return 2

    # targets [n, 2] = start and end token index
    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        start, end = logits.float().unbind(-1)
        return (F.cross_entropy(start, targets[:, 0]) + F.cross_entropy(end, targets[:, 1])) / 2

    def best_span(self, logits: torch.Tensor, row: EncodedRow) -> tuple[int, int, float] | None:
        """(start token, end token, probability) of the best span inside the context, or None."""
        ctx = [t for t, s in enumerate(row.sequence_ids) if s == 1]
        if not ctx:
            return None
        idx = torch.tensor(ctx)
        start = torch.log_softmax(logits[idx, 0].float(), -1)
        end = torch.log_softmax(logits[idx, 1].float(), -1)
        scores = start[:, None] + end[None, :]  # [Tc, Tc]: span (i, j)
        n = len(ctx)
        i = torch.arange(n)
        valid = (i[None, :] >= i[:, None]) & (i[None, :] - i[:, None] < self.config.max_answer_tokens)
        scores = scores.masked_fill(~valid, float("-inf"))
        flat = int(scores.argmax())
        s, e = divmod(flat, n)
        return ctx[s], ctx[e], float(scores[s, e].exp())

    def postprocess(self, logits: torch.Tensor, row: EncodedRow) -> dict[str, Any]:
        span = self.best_span(logits[: len(row)], row)
        if span is None:
            return {"answer": "", "start": 0, "end": 0, "score": 0.0}
        s, e, p = span
        start, end = row.offsets[s][0], row.offsets[e][1]
        return {"answer": (row.text_pair or "")[start:end], "start": start, "end": end, "score": p}


def qa_examples(examples: Sequence[Example]) -> Sequence[QAExample]:
    """The examples of this kind (it asked the readers for QAExamples)."""
    return cast("Sequence[QAExample]", examples)


class QuestionAnsweringKind(TaskKind):
    name: ClassVar[str] = "qa"
    head_class = QuestionAnsweringHead
    sequence_level: ClassVar[bool] = False
    labelled: ClassVar[bool] = False
    question_answering: ClassVar[bool] = True
    dataset_formats: ClassVar[tuple[str, ...]] = ("squad",)
    metrics: ClassVar[tuple[str, ...]] = ("exact_match", "f1")
    default_metric: ClassVar[str] = "f1"

    def label_problem(self, labels: Sequence[str]) -> str | None:
        return "a qa head has no labels" if labels else None

    def serving_inputs(self, examples: Sequence[Example]) -> tuple[list[str], list[str] | None]:
        questions = qa_examples(examples)
        return [e.question for e in questions], [e.context for e in questions]

    def targets(self, rows: Sequence[EncodedRow], examples: Sequence[Example], labels: Sequence[str]) -> Targets:
        """Start/end token of the first answer; questions whose answer truncation cut off are dropped."""
        kept_rows: list[EncodedRow] = []
        spans: list[tuple[int, int]] = []
        for r, qa in zip(rows, qa_examples(examples)):
            span = answer_tokens(r, qa)
            if span is not None:
                kept_rows.append(r)
                spans.append(span)
        return Targets(kept_rows, spans, dropped=len(rows) - len(kept_rows))

    def collate(self, targets: Sequence[Any], width: int) -> torch.Tensor:
        return torch.tensor(targets, dtype=torch.long).reshape(-1, 2)

    def score(self, examples: Sequence[Example], predictions: Sequence[dict[str, Any]], labels: Sequence[str],
              extra: Sequence[str] = ()) -> dict[str, float]:
        answers = [[text for text, _ in e.answers] for e in qa_examples(examples)]
        return M.squad_scores([p["answer"] for p in predictions], answers)


def answer_tokens(row: EncodedRow, example: QAExample) -> tuple[int, int] | None:
    """(start, end) token indices of the first gold answer inside the context window, or None if cut off."""
    text, start = example.answers[0]
    end = start + len(text)
    ctx = [t for t, s in enumerate(row.sequence_ids) if s == 1]
    if not ctx or row.offsets[ctx[-1]][1] < end:
        return None
    first = next((t for t in ctx if row.offsets[t][1] > start), None)
    last = next((t for t in reversed(ctx) if row.offsets[t][0] < end), None)
    if first is None or last is None or last < first:
        return None
    return first, last
