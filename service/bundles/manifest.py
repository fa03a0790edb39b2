"""The manifest: what a bundle is, stored as JSON in the safetensors `__metadata__` of the bundle file."""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping
from datetime import datetime, timezone
from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from service.errors import InvalidTaskName
from service.kinds import HeadConfig, HeadType, TaskKind, head_type_of, kind_of

__all__ = ["LORA_TARGETS", "Activation", "AdapterConfig", "BackboneRef", "HeadConfig", "HeadType", "LoraConfig",
           "Manifest", "Placement", "check_task_name"]

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
    reads: Literal["projection", "normed"] = Field(
        "projection", description="what the adapter reads at a point: the sub-layer's output projection h "
        "(Houlsby et al.: LN(h + adapter(h) + x), x the sub-layer's input), or that output after the residual "
        "add and the sub-layer's LayerNorm (AdapterHub's seq_bn wiring: LN(z + adapter(LN(z))), z = h + x)")

    ln_before: bool = Field(False, description="the adapter's own LayerNorm on its input, before the "
                            "down-projection (AdapterHub's ln_before): adapter(x) = up(act(down(LN_a(x))))")
    ln_after: bool = Field(False, description="the adapter's own LayerNorm on its output, before the residual "
                           "add (AdapterHub's ln_after with adapter_residual_before_ln false)")
    ln_eps: float = Field(1e-5, gt=0, le=1e-2, description="eps of the adapter's own LayerNorms")

    @model_validator(mode="after")
    def _normed_has_no_task_norm(self) -> AdapterConfig:
        if self.train_layernorm and (self.reads == "normed" or self.ln_before or self.ln_after):
            raise ValueError("an adapter reading the LayerNorm's output, or with LayerNorms of its own, keeps the "
                             "backbone's LayerNorm: train_layernorm must be false")
        return self

    @property
    def own_norms(self) -> bool:
        """Whether the adapter has LayerNorms of its own (served per task, outside the batched paths)."""
        return self.ln_before or self.ln_after

    @property
    def points(self) -> tuple[str, ...]:
        return INSERTION_POINTS if self.placement is Placement.HOULSBY else ("ffn",)


LORA_TARGETS: tuple[str, ...] = ("query", "key", "value", "attn_out", "ffn_in", "ffn_out")
"""The linear projections of a layer LoRA can adapt, in forward order: attention query/key/value, attention
output, feed-forward inner (d -> d_ff) and output (d_ff -> d)."""


class LoraConfig(BaseModel):
    """LoRA (Hu et al. 2021, arXiv:2106.09685) on the backbone's linear projections, as PEFT trains it: each
    target projection computes `W x + b + scaling * (x @ A) @ B`, A [in, rank], B [rank, out]."""

    model_config = ConfigDict(extra="forbid")

    rank: int = Field(ge=1, le=256)
    scaling: float = Field(gt=0.0, description="lora_alpha / rank (lora_alpha / sqrt(rank) with rsLoRA)")
    targets: tuple[Literal["query", "key", "value", "attn_out", "ffn_in", "ffn_out"], ...] = Field(
        min_length=1, description="the adapted projections, in every layer")

    @field_validator("targets")
    @classmethod
    def _unique_in_order(cls, targets: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(targets)) != len(targets):
            raise ValueError("targets must be unique")
        return tuple(t for t in LORA_TARGETS if t in targets)


class BackboneRef(BaseModel):
    """Which backbone a bundle was trained on; loading checks it against the running one."""

    model_config = ConfigDict(extra="forbid")

    id: str
    fingerprint: str
    model_type: str
    hidden_size: int = Field(ge=1)
    num_layers: int = Field(ge=1)
    intermediate_size: int | None = Field(None, ge=1, description="width of the feed-forward's inner layer "
                                          "(LoRA on it needs it; bundles made before it was recorded omit it)")


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
    adapter: AdapterConfig | None = Field(None, description="bottleneck adapters; None with no `lora` either: a "
                                          "head on the plain backbone")
    lora: LoraConfig | None = Field(None, description="LoRA on the backbone's projections instead of bottleneck "
                                    "adapters (imported from PEFT)")
    backbone: BackboneRef
    max_length: int = Field(256, ge=8, description="tokens per row used in training")
    token_type_ids: bool = Field(True, description="feed the tokenizer's token type ids (segment A/B); false: all "
                                 "zero, as the task was trained (PEFT's question-answering models drop them)")
    created_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    metrics: dict[str, float] = Field(default_factory=dict)
    training: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_adapter_kind(self) -> Manifest:
        if self.adapter is not None and self.lora is not None:
            raise ValueError("a task has bottleneck adapters or LoRA, not both")
        if (self.lora is not None and {"ffn_in", "ffn_out"} & set(self.lora.targets)
                and self.backbone.intermediate_size is None):
            raise ValueError("LoRA on the feed-forward projections needs backbone.intermediate_size")
        return self

    @property
    def kind(self) -> TaskKind:
        """What the head type means (inputs, head, labels, training, scoring)."""
        return kind_of(self.head_type)

    @functools.cached_property
    def tensor_elements(self) -> int:
        """Elements of every tensor a bundle with this manifest holds (adapters, LoRA, head): times an element's
        size, what the task's weights take on a device. Computed once per manifest object: admission asks for
        it with every request."""
        from service.bundles.layout import expected_shapes  # layout builds on this module

        return sum(math.prod(shape) for shape in expected_shapes(self).values())

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Manifest:
        """A copy, without the figures cached from this object's fields (`update` may change them)."""
        copied = super().model_copy(update=update, deep=deep)
        copied.__dict__.pop("tensor_elements", None)
        return copied

    def output_size(self) -> int:
        """Width of the head's output layer implied by the head type and labels."""
        return self.kind.output_size(self.labels)
