"""Train one task on the frozen backbone: adapters + head (`adapter`), head alone (`head-only`), or every
weight (`full`, a baseline that writes no bundle). Evaluates after every epoch and keeps the best epoch.

The model is the serving backbone with the task's adapters attached in place (`attach_adapters`), and the
serving head class; evaluation runs each eval row through the head's own `postprocess`, exactly what the
engine returns, and scores those predictions. So the metrics in a bundle's manifest are the numbers the
service gives on the same inputs (tests check the two agree).
"""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from service.bundles.codec import encode_bundle
from service.bundles.manifest import Activation, AdapterConfig, HeadConfig, Manifest, Placement
from service.kinds import head_type_of, kind_of
from service.kinds.heads import TaskHead
from service.modeling.backbone import Backbone, load_backbone
from service.modeling.bottleneck import adapter_tensors, attach_adapters
from service.modeling.encoding import EncodedRow, Encoder
from service.modeling.heads import build_head, head_tensors
from service.settings import DEFAULT_BACKBONE
from service.training.batching import grouped_batches, make_batch, sorted_batches
from service.training.features import build_features, encode_inputs, infer_labels
from service.training.readers import Example
from service.training.scoring import is_better, score

log = logging.getLogger(__name__)

MODES = ("adapter", "head-only", "full")
DEFAULT_LR = {"adapter": 1e-3, "head-only": 1e-3, "full": 3e-5}


@dataclass
class TrainConfig:
    """Everything that defines a training run (recorded in the bundle's manifest)."""

    task: str
    head: str  # a HeadType (or a registered kind's name)
    mode: str = "adapter"
    backbone: str = DEFAULT_BACKBONE
    placement: Placement = Placement.HOULSBY
    bottleneck: int = 64
    activation: Activation = Activation.GELU
    train_layernorm: bool = False
    pooling: str = "mean"
    hidden_layer: bool = True
    threshold: float = 0.5
    max_answer_tokens: int = 30
    labels: list[str] | None = None  # label order; inferred from the training data when None
    epochs: int = 2
    lr: float | None = None  # None: DEFAULT_LR[mode]
    batch_size: int = 32
    eval_batch_size: int = 64
    max_length: int = 128
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    seed: int = 0
    device: str = "auto"
    warmup_ratio: float = 0.06
    weight_decay: float = 0.01
    max_grad_norm: float | None = 1.0
    metric: str | None = None  # chooses the best epoch; None: the kind's default metric
    progress: bool = True

    def __post_init__(self) -> None:
        self.head = head_type_of(self.head)
        kind = kind_of(self.head)
        self.placement, self.activation = Placement(self.placement), Activation(self.activation)
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {self.mode!r}")
        if self.lr is None:
            self.lr = DEFAULT_LR[self.mode]
        if self.metric is None:
            self.metric = kind.default_metric
        if self.metric not in kind.metrics:
            raise ValueError(f"metric {self.metric!r} does not fit a {kind.name} head; "
                             f"choose from {list(kind.metrics)}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch size must be at least 1")

    def adapter_config(self) -> AdapterConfig | None:
        if self.mode != "adapter":
            return None
        return AdapterConfig(placement=self.placement, bottleneck=self.bottleneck, activation=self.activation,
                             train_layernorm=self.train_layernorm)

    def head_config(self) -> HeadConfig:
        return HeadConfig(pooling=self.pooling, hidden_layer=self.hidden_layer, threshold=self.threshold,
                          max_answer_tokens=self.max_answer_tokens)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["head"] = kind_of(self.head).name
        for k in ("placement", "activation"):
            out[k] = getattr(self, k).value
        out.pop("progress")
        return out


@dataclass
class EpochResult:
    epoch: int
    loss: float
    train_seconds: float
    metrics: dict[str, float] = field(default_factory=dict)
    eval_seconds: float = 0.0


@dataclass
class TrainResult:
    """What a run produced. `bundle` is None for `full` (the backbone itself changed: nothing to ship)."""

    config: TrainConfig
    manifest: Manifest
    bundle: bytes | None
    history: list[EpochResult]
    best_epoch: int
    metrics: dict[str, float]
    params: dict[str, int]
    train_examples: int
    eval_examples: int
    dropped_examples: int
    train_seconds: float
    eval_rows: list[EncodedRow] = field(default_factory=list)
    predictions: list[dict[str, Any]] = field(default_factory=list)  # best epoch, one per eval example
    logits: list[torch.Tensor] = field(default_factory=list)  # best epoch, per eval row (real tokens only)

    def summary(self) -> dict[str, Any]:
        """JSON-ready record of the run (what `--report` writes and the accuracy table reads)."""
        return {
            "task": self.config.task, "mode": self.config.mode, "config": self.config.as_dict(),
            "best_epoch": self.best_epoch, "metrics": self.metrics, "params": self.params,
            "train_examples": self.train_examples, "eval_examples": self.eval_examples,
            "dropped_examples": self.dropped_examples, "train_seconds": round(self.train_seconds, 1),
            "bundle_bytes": len(self.bundle) if self.bundle is not None else None,
            "history": [asdict(e) for e in self.history],
        }


class TaskModel(nn.Module):
    """Backbone (with adapters attached, for `adapter`) + head: inputs -> logits."""

    def __init__(self, backbone: nn.Module, head: TaskHead):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = self.backbone(**batch).last_hidden_state
        return self.head(hidden, batch["attention_mask"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def subsample(examples: Sequence[Example], n: int | None, seed: int) -> list[Example]:
    """`n` examples drawn with `random.Random(seed).sample` (the peer's SST-2 sample for seed 0), or all."""
    if n is None or n >= len(examples):
        return list(examples)
    return [examples[i] for i in random.Random(seed).sample(range(len(examples)), n)]


def linear_warmup(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to the peak lr, then linear decay to 0 (transformers' get_linear_schedule_with_warmup)."""

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only (not on biases and LayerNorm weights), as BERT fine-tuning does."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def predict(model: TaskModel, encoder: Encoder, rows: Sequence[EncodedRow], device: torch.device,
            batch_size: int = 64) -> tuple[list[dict[str, Any]], list[torch.Tensor]]:
    """Serving predictions (and logits over each row's real tokens) for `rows`, in order."""
    was_training = model.training
    model.eval()
    preds: list[dict[str, Any] | None] = [None] * len(rows)
    logits: list[torch.Tensor | None] = [None] * len(rows)
    try:
        with torch.inference_mode():
            for idx in sorted_batches([len(r) for r in rows], batch_size):
                batch = encoder.collate([rows[i] for i in idx], device)
                out = model(batch).float().cpu()
                for k, i in enumerate(idx):
                    row_logits = out[k] if out.dim() == 2 else out[k, : len(rows[i])]
                    pred = model.head.postprocess(row_logits, rows[i])
                    if rows[i].truncated:
                        pred["truncated"] = True  # as the engine flags it
                    preds[i], logits[i] = pred, row_logits.clone()
    finally:
        model.train(was_training)
    # casts: sorted_batches puts every row in exactly one batch, so no None is left
    return cast("list[dict[str, Any]]", preds), cast("list[torch.Tensor]", logits)


def train(
    config: TrainConfig, train_examples: Sequence[Example], eval_examples: Sequence[Example] | None = None, *,
    backbone: Backbone | None = None, training_info: dict[str, Any] | None = None,
    on_epoch: Callable[[EpochResult], None] | None = None,
) -> TrainResult:
    """Train, evaluate each epoch, and return the best epoch's bundle and metrics.

    `backbone` (loaded float32 when not given) is modified in place: adapters are attached to it, and
    `full` mode trains its weights. `training_info` is merged into the manifest's `training` record.
    """
    from tqdm.auto import tqdm

    seed_everything(config.seed)
    backbone = backbone or load_backbone(config.backbone, device=config.device, dtype="float32")
    device = backbone.device
    head_type = config.head
    train_set = subsample(train_examples, config.max_train_examples, config.seed)
    eval_set = subsample(eval_examples, config.max_eval_examples, config.seed) if eval_examples else []
    labels = infer_labels(head_type, train_set, config.labels)
    manifest = Manifest(
        task=config.task, head_type=head_type, labels=labels, head=config.head_config(),
        adapter=config.adapter_config(), backbone=backbone.ref, max_length=config.max_length,
    )

    encoder = Encoder(backbone.tokenizer, backbone.max_length, backbone.uses_token_type_ids)
    feats = build_features(encoder, head_type, train_set, labels, config.max_length)
    if not feats.rows:
        raise ValueError("no usable training examples")
    eval_rows = encode_inputs(encoder, head_type, eval_set, config.max_length) if eval_set else []

    torch.manual_seed(config.seed)  # adapter and head initialisation
    backbone_params = sum(p.numel() for p in backbone.model.parameters())
    cfg = manifest.adapter
    added = attach_adapters(backbone.model, backbone.spec, cfg, backbone.ref.hidden_size) if cfg else {}
    head = build_head(manifest).to(device)
    if config.mode == "full":
        backbone.model.requires_grad_(True)
    model = TaskModel(backbone.model, head)
    trainable = [p for p in model.parameters() if p.requires_grad]
    params = {
        "backbone": backbone_params,
        "adapter": sum(p.numel() for m in added.values() for p in m.parameters()),
        "head": sum(p.numel() for p in head.parameters()),
        "trainable": sum(p.numel() for p in trainable),
    }

    assert config.lr is not None and config.metric is not None  # set by TrainConfig.__post_init__
    optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr)
    steps_per_epoch = math.ceil(len(feats.rows) / config.batch_size)
    total = steps_per_epoch * config.epochs
    scheduler = linear_warmup(optimizer, int(round(config.warmup_ratio * total)), total)
    lengths = [len(r) for r in feats.rows]
    order_rng = random.Random(config.seed + 1)
    log.info("%s/%s: %d train rows (%d dropped), %d eval rows, %d steps, trainable %d of %d backbone params",
             config.task, config.mode, len(feats.rows), feats.dropped, len(eval_rows), total,
             params["trainable"], backbone_params)

    history: list[EpochResult] = []
    # (epoch, metrics, trainable state, predictions, logits) of the best epoch so far
    best: tuple[int, dict[str, float], dict[str, torch.Tensor] | None, list[dict[str, Any]],
                list[torch.Tensor]] | None = None
    train_seconds = 0.0
    for epoch in range(1, config.epochs + 1):
        model.train()
        batches = grouped_batches(lengths, config.batch_size, order_rng)
        t0 = time.perf_counter()
        loss_sum, seen = 0.0, 0
        bar = tqdm(batches, desc=f"{config.task} {config.mode} epoch {epoch}/{config.epochs}", unit="batch",
                   disable=not config.progress, mininterval=2.0, dynamic_ncols=True)
        for step, idx in enumerate(bar):
            batch, y = make_batch(encoder, head_type, [feats.rows[i] for i in idx],
                                  [feats.targets[i] for i in idx], device)
            loss = head.loss(model(batch), y)
            loss.backward()
            if step == 0 and epoch == 1:
                params["receiving_grad"] = sum(p.numel() for p in trainable if p.grad is not None)
            if config.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach().item() * len(idx)
            seen += len(idx)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{loss_sum / seen:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        bar.close()
        result = EpochResult(epoch, loss_sum / max(seen, 1), time.perf_counter() - t0)
        train_seconds += result.train_seconds
        preds: list[dict[str, Any]] = []
        logits: list[torch.Tensor] = []
        if eval_rows:
            t1 = time.perf_counter()
            preds, logits = predict(model, encoder, eval_rows, device, config.eval_batch_size)
            result.metrics = score(head_type, eval_set, preds, labels, extra=(config.metric,))
            result.eval_seconds = time.perf_counter() - t1
        history.append(result)
        log.info("epoch %d: loss %.4f, %s (%.0fs train, %.0fs eval)", epoch, result.loss,
                 ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items()), result.train_seconds,
                 result.eval_seconds)
        if on_epoch:
            on_epoch(result)
        if not eval_rows or best is None or is_better(config.metric, result.metrics[config.metric],
                                                       best[1][config.metric]):
            state = None if config.mode == "full" else {
                k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
            best = (epoch, result.metrics, state, preds, logits)

    assert best is not None
    best_epoch, metrics, state, preds, logits = best
    bundle = None
    if state is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in state:
                    p.copy_(state[name])
        manifest = copy.deepcopy(manifest)
        manifest.metrics = {k: round(float(v), 6) for k, v in metrics.items()}
        manifest.training = {
            **config.as_dict(), "best_epoch": best_epoch, "train_examples": len(feats.rows),
            "dropped_examples": feats.dropped, "eval_examples": len(eval_set),
            "train_seconds": round(train_seconds, 1), "parameters": params,
            "history": [{"epoch": e.epoch, "loss": round(e.loss, 6), "train_seconds": round(e.train_seconds, 1),
                         "metrics": {k: round(v, 6) for k, v in e.metrics.items()}} for e in history],
            "torch": torch.__version__, "device": str(device), **(training_info or {}),
        }
        bundle = encode_bundle(manifest, {**adapter_tensors(added), **head_tensors(head)})
    return TrainResult(
        config=config, manifest=manifest, bundle=bundle, history=history, best_epoch=best_epoch,
        metrics=metrics, params=params, train_examples=len(feats.rows), eval_examples=len(eval_set),
        dropped_examples=feats.dropped, train_seconds=train_seconds, eval_rows=eval_rows,
        predictions=preds, logits=logits,
    )
