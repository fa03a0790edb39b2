"""The shared shapes of task heads: pooled (one prediction per row) and per-token. Each kind's module
subclasses one of them with its loss and its post-processing; parameter names match the bundle layout
(`head.` prefix stripped)."""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from service.kinds.rows import EncodedRow

IGNORE_INDEX = -100
"""Token targets that take no part in the loss (sub-tokens, special tokens)."""


class HeadConfig(BaseModel):
    """Head hyper-parameters that change its shape or its post-processing."""

    model_config = ConfigDict(extra="forbid")

    pooling: Literal["mean", "cls"] = Field("mean", description="sequence-level heads: how tokens are pooled")
    hidden_layer: bool = Field(True, description="sequence-level heads: a d->d tanh layer before the output")
    threshold: float = Field(0.5, gt=0.0, lt=1.0, description="multilabel: a label is on when sigmoid >= this")
    max_answer_tokens: int = Field(30, ge=1, le=512, description="qa: longest answer span, in tokens")


def pool_tokens(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """[n, T, d] -> [n, d]: the [CLS] token, or the mean over real (mask = 1) tokens."""
    if pooling == "cls":
        return hidden[:, 0]
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


class TaskHead(nn.Module):
    """Base: maps the backbone's last hidden states of a task's rows to logits."""

    def __init__(self, hidden: int, labels: list[str], config: HeadConfig, dropout: float = 0.1):
        super().__init__()
        self.labels = list(labels)
        self.config = config
        self.dropout = nn.Dropout(dropout)

    @classmethod
    def output_width(cls, labels: list[str]) -> int:
        """Width of the output layer for `labels` (one logit per label unless a head says otherwise)."""
        return len(labels)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # [n,T,d], [n,T] -> logits
        raise NotImplementedError

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def postprocess(self, logits: torch.Tensor, row: EncodedRow) -> dict[str, Any]:
        """One row's logits (float32, CPU) -> the prediction returned to the user. Serving and training
        evaluation both call this, so a trained score is the score of what the service answers."""
        raise NotImplementedError


class SequenceHead(TaskHead):
    """Pool the tokens (mean over the mask, or [CLS]), optional d->d tanh layer, then d->C."""

    def __init__(self, hidden: int, labels: list[str], config: HeadConfig, dropout: float = 0.1):
        super().__init__(hidden, labels, config, dropout)
        self.dense = nn.Linear(hidden, hidden) if config.hidden_layer else None
        self.out = nn.Linear(hidden, self.output_width(self.labels))

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # -> [n, d]
        return pool_tokens(hidden, mask, self.config.pooling)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # -> [n, C]
        return self.from_pooled(self.pool(hidden, mask))

    def from_pooled(self, pooled: torch.Tensor) -> torch.Tensor:  # [n, d] -> [n, C]
        """The head after pooling; lets a mixed batch pool all rows at once."""
        x = self.dropout(pooled)
        if self.dense is not None:
            x = self.dropout(torch.tanh(self.dense(x)))
        logits: torch.Tensor = self.out(x)
        return logits


class TokenHead(TaskHead):
    """Per-token d->C (token classification) or d->2 (QA start/end)."""

    def __init__(self, hidden: int, labels: list[str], config: HeadConfig, dropout: float = 0.1):
        super().__init__(hidden, labels, config, dropout)
        self.out = nn.Linear(hidden, self.output_width(self.labels))

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # -> [n, T, C]
        logits: torch.Tensor = self.out(self.dropout(hidden))
        return logits
