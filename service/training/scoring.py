"""Score serving predictions (the dicts a head's `postprocess` returns) against gold examples.

Training evaluation and the `evaluate` command both go through here, so the trainer's numbers and a
re-score of the bundle through the engine are computed the same way, from the same prediction format. Which
metrics a head type reports, and how, is its kind's (`TaskKind.metrics`, `.score`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from service.kinds import kind_names, kind_of
from service.kinds.examples import Example
from service.kinds.token_classification import entity_token_spans

__all__ = ["entity_token_spans", "is_better", "metrics_of", "score"]


def metrics_of(head: str) -> tuple[str, tuple[str, ...]]:
    """(default metric, every metric) of a head type: the default picks the best epoch."""
    kind = kind_of(head)
    return kind.default_metric, kind.metrics


def score(head: str, examples: Sequence[Example], predictions: Sequence[dict[str, Any]],
          labels: Sequence[str] = (), extra: Sequence[str] = ()) -> dict[str, float]:
    """Metrics of `predictions` (one serving dict per example). `extra` asks for optional metrics (mcc)."""
    if len(examples) != len(predictions):
        raise ValueError(f"{len(examples)} examples but {len(predictions)} predictions")
    return kind_of(head).score(examples, predictions, labels, extra)


def is_better(metric: str, new: float, old: float | None) -> bool:
    if old is None:
        return True
    lower = any(metric in kind_of(name).lower_is_better for name in kind_names())
    return new < old if lower else new > old
