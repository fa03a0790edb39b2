"""Score serving predictions (the dicts a head's `postprocess` returns) against gold examples.

Training evaluation and the `evaluate` command both go through here, so the trainer's numbers and a
re-score of the bundle through the engine are computed the same way, from the same prediction format.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

from service.bundles.manifest import HeadType
from service.training import metrics as M
from service.training.features import word_starts
from service.training.readers import (
    Example,
    classification_examples,
    multilabel_examples,
    qa_examples,
    regression_examples,
    token_examples,
)

DEFAULT_METRIC: dict[HeadType, str] = {
    HeadType.CLASSIFICATION: "accuracy",
    HeadType.MULTILABEL: "micro_f1",
    HeadType.REGRESSION: "spearman",
    HeadType.TOKEN_CLASSIFICATION: "f1",
    HeadType.QA: "f1",
}

METRICS: dict[HeadType, tuple[str, ...]] = {
    HeadType.CLASSIFICATION: ("accuracy", "macro_f1", "mcc"),
    HeadType.MULTILABEL: ("micro_f1", "macro_f1", "subset_accuracy"),
    HeadType.REGRESSION: ("pearson", "spearman", "mse"),
    HeadType.TOKEN_CLASSIFICATION: ("f1", "precision", "recall"),
    HeadType.QA: ("exact_match", "f1"),
}
"""Metrics each head reports (the first is the default for choosing the best epoch, except where
DEFAULT_METRIC says otherwise). `mcc` is computed only when asked for."""

LOWER_IS_BETTER = {"mse"}


def score(head: HeadType, examples: Sequence[Example], predictions: Sequence[dict[str, Any]],
          labels: Sequence[str] = (), extra: Sequence[str] = ()) -> dict[str, float]:
    """Metrics of `predictions` (one serving dict per example). `extra` asks for optional metrics (mcc)."""
    if len(examples) != len(predictions):
        raise ValueError(f"{len(examples)} examples but {len(predictions)} predictions")
    if head is HeadType.CLASSIFICATION:
        gold = [e.label for e in classification_examples(examples)]
        pred = [p["label"] for p in predictions]
        out = {"accuracy": M.accuracy(gold, pred), "macro_f1": M.macro_f1(gold, pred)}
        if "mcc" in extra:
            out["mcc"] = M.matthews_corrcoef(gold, pred)
        return out
    if head is HeadType.MULTILABEL:
        gold_sets = [e.labels for e in multilabel_examples(examples)]
        return M.multilabel_scores(gold_sets, [p["labels"] for p in predictions], labels)
    if head is HeadType.REGRESSION:
        gold_scores = [e.score for e in regression_examples(examples)]
        pred_scores = [p["value"] for p in predictions]
        mse = sum((g - p) ** 2 for g, p in zip(gold_scores, pred_scores)) / len(gold_scores)
        return {"pearson": M.pearson(gold_scores, pred_scores),
                "spearman": M.spearman(gold_scores, pred_scores), "mse": mse}
    if head is HeadType.TOKEN_CLASSIFICATION:
        sentences = token_examples(examples)
        gold_spans = [M.bio_spans(e.tags) for e in sentences]
        pred_spans = [entity_token_spans(e.tokens, p["entities"]) for e, p in zip(sentences, predictions)]
        return M.entity_scores(gold_spans, pred_spans)
    answers = [[text for text, _ in e.answers] for e in qa_examples(examples)]
    return M.squad_scores([p["answer"] for p in predictions], answers)


def entity_token_spans(tokens: Sequence[str], entities: Sequence[dict[str, Any]]) -> list[M.Span]:
    """Serving entities (character spans in the space-joined sentence) -> (type, first word, last word + 1)."""
    starts = word_starts(tokens)
    spans: list[M.Span] = []
    for ent in entities:
        first = bisect.bisect_right(starts, ent["start"]) - 1
        last = bisect.bisect_right(starts, max(ent["end"] - 1, ent["start"])) - 1
        spans.append((ent["entity"], first, last + 1))
    return spans


def is_better(metric: str, new: float, old: float | None) -> bool:
    if old is None:
        return True
    return new < old if metric in LOWER_IS_BETTER else new > old
