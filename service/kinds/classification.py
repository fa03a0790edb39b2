"""Single-label classification: softmax over the labels; accuracy, macro-F1 (and Matthews correlation)."""

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


class ClassificationHead(SequenceHead):
    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), targets)

    def postprocess(self, logits: torch.Tensor, row: EncodedRow) -> dict[str, Any]:
        probs = torch.softmax(logits.float(), -1).tolist()
        best = max(range(len(probs)), key=probs.__getitem__)
        return {"label": self.labels[best], "score": probs[best], "scores": dict(zip(self.labels, probs))}


class ClassificationKind(SequenceKind):
    name: ClassVar[str] = "classification"
    head_class = ClassificationHead
    metrics: ClassVar[tuple[str, ...]] = ("accuracy", "macro_f1", "mcc")
    default_metric: ClassVar[str] = "accuracy"
    optional_metrics: ClassVar[tuple[str, ...]] = ("mcc",)

    def label_problem(self, labels: Sequence[str]) -> str | None:
        return "a classification head needs at least 2 labels" if len(labels) < 2 else None

    def example_from_record(self, text: str, pair: str | None, target: Any, *, label_sep: str, line: int,
                            ) -> Example:
        label = str(target).strip() if isinstance(target, (str, int)) and not isinstance(target, bool) else None
        if not label:
            raise ValueError(f"label {target!r} is empty or not a string/integer")
        return TextExample(text, pair, label=label, line=line)

    def infer_labels(self, examples: Sequence[Example], order: Sequence[str] | None = None) -> list[str]:
        if order:
            return list(dict.fromkeys(order))
        return sorted({_label(e) for e in text_examples(examples)}, key=natural_key)

    def targets(self, rows: Sequence[EncodedRow], examples: Sequence[Example], labels: Sequence[str]) -> Targets:
        index = label_index(labels)
        gold = [_label(e) for e in text_examples(examples)]
        missing = sorted(set(gold) - set(index))
        if missing:
            raise ValueError(f"labels {missing[:5]} are not in the label list {list(labels)}")
        return Targets(list(rows), [index[g] for g in gold])

    def collate(self, targets: Sequence[Any], width: int) -> torch.Tensor:
        return torch.tensor(targets, dtype=torch.long)

    def score(self, examples: Sequence[Example], predictions: Sequence[dict[str, Any]], labels: Sequence[str],
              extra: Sequence[str] = ()) -> dict[str, float]:
        gold = [_label(e) for e in text_examples(examples)]
        pred = [p["label"] for p in predictions]
        out = {"accuracy": M.accuracy(gold, pred), "macro_f1": M.macro_f1(gold, pred)}
        if "mcc" in extra:
            out["mcc"] = M.matthews_corrcoef(gold, pred)
        return out


def _label(example: TextExample) -> str:
    assert example.label is not None  # read for this kind: example_from_record set it
    return example.label
