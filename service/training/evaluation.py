"""Re-score a bundle through the serving engine: store -> Engine -> chunked `engine.run` -> metrics.

This is the service's own path (slot pool, routed forward, `postprocess`), so its numbers are what users
get; `train` records the same metrics from its own forward, and tests check that both agree.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch

from service.bundles.manifest import Manifest
from service.bundles.store import AdapterStore, LocalAdapterStore
from service.modeling.backbone import Backbone
from service.runtime.engine import Engine, RowRequest
from service.training.batching import sorted_batches
from service.training.features import serving_inputs
from service.training.readers import Example
from service.training.scoring import score


@dataclass
class Evaluation:
    task: str
    version: int
    metrics: dict[str, float]
    examples: int
    predictions: list[dict[str, Any]] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)


def engine_for(backbone: Backbone, store: AdapterStore, max_seq_length: int | None = None,
               packing: str = "auto") -> Engine:
    """An engine that does not cap inputs below the backbone's limit unless asked (`max_seq_length`), so a
    bundle is scored at the `max_length` it was trained with."""
    return Engine(backbone, store, max_seq_length=max_seq_length or backbone.max_length, cache_max_slots=4,
                  packing=packing)


def temporary_store(bundle: bytes, task: str) -> tuple[LocalAdapterStore, tempfile.TemporaryDirectory[str]]:
    """A throw-away local store holding one bundle as `task` version 1 (keep the directory object alive)."""
    tmp = tempfile.TemporaryDirectory(prefix="adapter-eval-")
    store = LocalAdapterStore(Path(tmp.name))
    store.put(task, bundle)
    return store, tmp


def evaluate_task(
    engine: Engine, task: str, examples: Sequence[Example], *, version: int | None = None,
    batch_size: int = 64, extra_metrics: Sequence[str] = (), keep_logits: bool = False,
) -> Evaluation:
    """Predict every example with `task@version` (active version by default) and score the predictions."""
    version = engine.store.get_active(task) if version is None else version
    manifest: Manifest = engine.store.get_info(task, version).manifest
    texts, pairs = serving_inputs(manifest.head_type, examples)
    rows = engine.encode(manifest, texts, pairs)
    predictions: list[dict[str, Any] | None] = [None] * len(rows)
    logits: list[torch.Tensor | None] = [None] * len(rows)
    for idx in sorted_batches([len(r) for r in rows], batch_size):
        results = engine.run([RowRequest(task, version, rows[i]) for i in idx], keep_logits=keep_logits)
        for i, res in zip(idx, results):
            if res.error is not None:
                raise res.error
            predictions[i] = res.prediction
            if keep_logits and res.logits is not None:
                logits[i] = res.logits if res.logits.dim() == 1 else res.logits[: len(rows[i])]
    # casts: sorted_batches puts every row in exactly one batch and a failed row raises above, so every
    # prediction is set; with keep_logits every row's logits too (the engine keeps them for each prediction)
    done = cast("list[dict[str, Any]]", predictions)
    metrics = score(manifest.head_type, examples, done, manifest.labels, extra=extra_metrics)
    return Evaluation(task, version, metrics, len(examples), done,
                      cast("list[torch.Tensor]", logits) if keep_logits else [])
