"""The manifest: what a bundle is, stored as JSON in the safetensors `__metadata__` of the bundle file."""

from __future__ import annotations

import re
from datetime import datetime, timezone
from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.errors import InvalidTaskName

FORMAT_VERSION = 1
TASK_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


def check_task_name(task: str) -> str:
    """Return `task` if it is a valid task name, else raise InvalidTaskName (names are also path parts)."""
    if not isinstance(task, str) or not TASK_NAME_RE.fullmatch(task):
        raise InvalidTaskName(
            f"invalid task name {task!r}: use 1-64 characters of a-z, 0-9, '_' and '-', starting with a letter or digit"
        )
    return task


class HeadType(str, Enum):
    CLASSIFICATION = "classification"
    MULTILABEL = "multilabel"
    REGRESSION = "regression"
    TOKEN_CLASSIFICATION = "token-classification"
    QA = "qa"

    @property
    def is_sequence_level(self) -> bool:
        """One prediction per input row (pooled), as opposed to one per token."""
        return self in (HeadType.CLASSIFICATION, HeadType.MULTILABEL, HeadType.REGRESSION)


class Placement(str, Enum):
    HOULSBY = "houlsby"  # after the attention output projection and after the FFN output projection
    PFEIFFER = "pfeiffer"  # after the FFN output projection only


class Activation(str, Enum):
    GELU = "gelu"
    RELU = "relu"
    SWISH = "swish"


INSERTION_POINTS: tuple[str, ...] = ("attn", "ffn")
"""The two insertion points of every layer, in forward order."""


class AdapterConfig(BaseModel):
    """Shape of a task's bottleneck adapters: `d -> m -> d` at each insertion point the placement names."""

    model_config = ConfigDict(extra="forbid")

    placement: Placement = Placement.HOULSBY
    bottleneck: int = Field(64, ge=1, le=4096, description="m, the bottleneck width")
    activation: Activation = Activation.GELU
    train_layernorm: bool = Field(False, description="task-specific LayerNorm after each adapted sublayer")

    @property
    def points(self) -> tuple[str, ...]:
        return INSERTION_POINTS if self.placement is Placement.HOULSBY else ("ffn",)


class HeadConfig(BaseModel):
    """Head hyper-parameters that change its shape or its post-processing."""

    model_config = ConfigDict(extra="forbid")

    pooling: Literal["mean", "cls"] = Field("mean", description="sequence-level heads: how tokens are pooled")
    hidden_layer: bool = Field(True, description="sequence-level heads: a d->d tanh layer before the output")
    threshold: float = Field(0.5, gt=0.0, lt=1.0, description="multilabel: a label is on when sigmoid >= this")
    max_answer_tokens: int = Field(30, ge=1, le=512, description="qa: longest answer span, in tokens")


class BackboneRef(BaseModel):
    """Which backbone a bundle was trained on; loading checks it against the running one."""

    model_config = ConfigDict(extra="forbid")

    id: str
    fingerprint: str
    model_type: str
    hidden_size: int = Field(ge=1)
    num_layers: int = Field(ge=1)


class Manifest(BaseModel):
    """Everything needed to rebuild a task from its tensors, and to refuse it on the wrong backbone."""

    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    task: str
    head_type: HeadType
    labels: list[str] = Field(default_factory=list)
    head: HeadConfig = Field(default_factory=HeadConfig)
    adapter: AdapterConfig | None = Field(None, description="None: a head on the plain backbone (no adapter)")
    backbone: BackboneRef
    max_length: int = Field(256, ge=8, description="tokens per row used in training")
    created_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    metrics: dict[str, float] = Field(default_factory=dict)
    training: dict[str, Any] = Field(default_factory=dict)

    def output_size(self) -> int:
        """Width of the head's output layer implied by the head type and labels."""
        if self.head_type is HeadType.REGRESSION:
            return 1
        if self.head_type is HeadType.QA:
            return 2
        return len(self.labels)
