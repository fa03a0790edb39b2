"""Multi-label classification: a sigmoid per label, on at the head's threshold; micro/macro-F1 and subset
accuracy."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from service.kinds import metrics as M
from service.kinds.base import Targets, label_index
from service.kinds.examples import Example, TextExample
from service.kinds.heads import SequenceHead
from service.kinds.rows import EncodedRow
from service.kinds.sequence import SequenceKind, natural_key, text_examples


class MultiLabelHead(SequenceHead):
    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits.float(), targets.float())

    def postprocess(self, logits: torch.Tensor, row: EncodedRow) -> dict[str, Any]:
        probs = torch.sigmoid(logits.float()).tolist()
        on = [name for name, p in zip(self.labels, probs) if p >= self.config.threshold]
        return {"labels": on, "scores": dict(zip(self.labels, probs))}


class MultiLabelKind(SequenceKind):
    name: ClassVar[str] = "multilabel"
    head_class = MultiLabelHead
    metrics: ClassVar[tuple[str, ...]] = ("micro_f1", "macro_f1", "subset_accuracy")
    default_metric: ClassVar[str] = "micro_f1"

    def label_problem(self, labels: Sequence[str]) -> str | None:
        return "a multilabel head needs at least 1 label" if len(labels) < 1 else None

    def example_from_record(self, text: str, pair: str | None, target: Any, *, label_sep: str, line: int,
                            ) -> Example:
        if isinstance(target, list):
            labels = tuple(str(x).strip() for x in target)
        elif isinstance(target, str):
            labels = tuple(x.strip() for x in target.split(label_sep) if x.strip())
        else:
            raise ValueError(f"labels {target!r} must be a list or a '{label_sep}'-separated string")
        if any(not x for x in labels):
            raise ValueError("empty label name")
        return TextExample(text, pair, labels=labels, line=line)

    def infer_labels(self, examples: Sequence[Example], order: Sequence[str] | None = None) -> list[str]:
        if order:
            return list(dict.fromkeys(order))
        return sorted({name for e in text_examples(examples) for name in _labels(e)}, key=natural_key)

    def targets(self, rows: Sequence[EncodedRow], examples: Sequence[Example], labels: Sequence[str]) -> Targets:
        index = label_index(labels)
        out = []
        for example in text_examples(examples):
            vec = [0.0] * len(labels)
            for name in _labels(example):
                if name not in index:
                    raise ValueError(f"label {name!r} is not in the label list {list(labels)}")
                vec[index[name]] = 1.0
            out.append(vec)
        return Targets(list(rows), out)

    def collate(self, targets: Sequence[Any], width: int) -> torch.Tensor:
        return torch.tensor(targets, dtype=torch.float32)

    def score(self, examples: Sequence[Example], predictions: Sequence[dict[str, Any]], labels: Sequence[str],
              extra: Sequence[str] = ()) -> dict[str, float]:
        gold = [_labels(e) for e in text_examples(examples)]
        return M.multilabel_scores(gold, [p["labels"] for p in predictions], labels)


def _labels(example: TextExample) -> tuple[str, ...]:
    assert example.labels is not None  # read for this kind: example_from_record set them
    return example.labels
