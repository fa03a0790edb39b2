"""Regression: one output, the value itself; Pearson, Spearman (the default) and MSE."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from service.kinds import metrics as M
from service.kinds.base import Targets
from service.kinds.examples import Example, TextExample
from service.kinds.heads import SequenceHead
from service.kinds.rows import EncodedRow
from service.kinds.sequence import SequenceKind, text_examples


class RegressionHead(SequenceHead):
    @classmethod
    def output_width(cls, labels: list[str]) -> int:
        return 1

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(logits.float().squeeze(-1), targets.float())

    def postprocess(self, logits: torch.Tensor, row: EncodedRow) -> dict[str, Any]:
        return {"value": float(logits.float().reshape(-1)[0])}


class RegressionKind(SequenceKind):
    name: ClassVar[str] = "regression"
    head_class = RegressionHead
    labelled: ClassVar[bool] = False
    metrics: ClassVar[tuple[str, ...]] = ("pearson", "spearman", "mse")
    default_metric: ClassVar[str] = "spearman"
    lower_is_better: ClassVar[frozenset[str]] = frozenset({"mse"})

    def label_problem(self, labels: Sequence[str]) -> str | None:
        return "a regression head has one output; give at most 1 label (its name)" if len(labels) > 1 else None

    def example_from_record(self, text: str, pair: str | None, target: Any, *, label_sep: str, line: int,
                            ) -> Example:
        try:
            score = float(target)
        except (TypeError, ValueError):
            raise ValueError(f"score {target!r} is not a number") from None
        if score != score or score in (float("inf"), float("-inf")):
            raise ValueError(f"score {target!r} is not finite")
        return TextExample(text, pair, score=score, line=line)

    def targets(self, rows: Sequence[EncodedRow], examples: Sequence[Example], labels: Sequence[str]) -> Targets:
        return Targets(list(rows), [_score(e) for e in text_examples(examples)])

    def collate(self, targets: Sequence[Any], width: int) -> torch.Tensor:
        return torch.tensor(targets, dtype=torch.float32)

    def score(self, examples: Sequence[Example], predictions: Sequence[dict[str, Any]], labels: Sequence[str],
              extra: Sequence[str] = ()) -> dict[str, float]:
        gold = [_score(e) for e in text_examples(examples)]
        pred = [p["value"] for p in predictions]
        mse = sum((g - p) ** 2 for g, p in zip(gold, pred)) / len(gold)
        return {"pearson": M.pearson(gold, pred), "spearman": M.spearman(gold, pred), "mse": mse}


def _score(example: TextExample) -> float:
    assert example.score is not None  # read for this kind: example_from_record set it
    return example.score
