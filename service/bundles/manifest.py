"""The manifest: what a bundle is, stored as JSON in the safetensors `__metadata__` of the bundle file."""

from __future__ import annotations

import re
from datetime import datetime, timezone
from enum import Enum
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from service.errors import InvalidTaskName
from service.kinds import HeadConfig, HeadType, TaskKind, head_type_of, kind_of

__all__ = ["Activation", "AdapterConfig", "BackboneRef", "HeadConfig", "HeadType", "Manifest", "Placement",
           "check_task_name"]

FORMAT_VERSION = 1
TASK_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


def check_task_name(task: str) -> str:
    """Return `task` if it is a valid task name, else raise InvalidTaskName (names are also path parts)."""
    if not isinstance(task, str) or not TASK_NAME_RE.fullmatch(task):
        raise InvalidTaskName(
            f"invalid task name {task!r}: use 1-64 characters of a-z, 0-9, '_' and '-', starting with a letter or digit"
        )
    return task


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
    head_type: Annotated[str, AfterValidator(head_type_of)] = Field(
        description="the task's kind: classification, multilabel, regression, token-classification, qa (a "
        "HeadType), or the name of a kind registered with service.kinds.register_kind")
    labels: list[str] = Field(default_factory=list)
    head: HeadConfig = Field(default_factory=HeadConfig)
    adapter: AdapterConfig | None = Field(None, description="None: a head on the plain backbone (no adapter)")
    backbone: BackboneRef
    max_length: int = Field(256, ge=8, description="tokens per row used in training")
    created_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    metrics: dict[str, float] = Field(default_factory=dict)
    training: dict[str, Any] = Field(default_factory=dict)

    @property
    def kind(self) -> TaskKind:
        """What the head type means (inputs, head, labels, training, scoring)."""
        return kind_of(self.head_type)

    def output_size(self) -> int:
        """Width of the head's output layer implied by the head type and labels."""
        return self.kind.output_size(self.labels)
