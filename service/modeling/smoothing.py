"""The `int8` mode's recipe: the attention and feed-forward inner projections smoothed and computed in int8 with
per-token activation scales; the feed-forward output projection in bfloat16 or float32.

- Query, key, value, attention output and feed-forward inner projection of every layer become `Int8Linear`s
  (`service.modeling.int8`): int8 weights with one scale per output channel, activations quantised per
  token, over their full 8 bits where the CPU has AVX512-VNNI, else over 7 (`int8.FbgemmKernel`).
- Smoothing first (SmoothQuant, Xiao et al. 2023, arXiv:2211.10438): transformer activations have a few
  channels far larger than the rest, which a per-token scale alone still loses. For y = x W^T + b and any
  s > 0, y = (x / s) (W diag(s))^T + b exactly; with s_j = max|x_j|^a / max|W_:j|^(1-a), the per-channel
  maxima max|x_j| calibrated once at start-up on `calibration.txt` (train-split texts), the activation's
  outlier channels shrink and the weight's columns take up the difference, where per-channel weight scales
  absorb it. `a` per role in `ALPHAS`, chosen on train data (docs/accuracy.md).
- The feed-forward output projection reads the GELU output, heavy-tailed within each token: in int8 it
  carried two thirds of the int8 model's error, in bfloat16 none measurable (docs/accuracy.md). It runs in
  `ffn_out_dtype`: bfloat16 where the CPU computes it fast, else float32 (`service.modeling.precision`).

The backbone stays frozen and its fingerprint is computed before this runs, so float32-trained bundles match.
The routed wrappers (adapters, LoRA) wrap these layers as they wrap a plain linear: they see the unsmoothed
float32 input and output.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources
from typing import TYPE_CHECKING

import torch
from torch import nn

from service.modeling.backbone import ArchSpec, get_layers, get_submodule, set_submodule
from service.modeling.int8 import RECIPES, CastLinear, full_range_activations, int8_projections
from service.modeling.precision import cpu_flags

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

ALPHAS = {"query": 0.5, "key": 0.5, "value": 0.5, "attn_out": 0.5, "ffn_in": 0.6}
"""Smoothing strength per int8 projection role (the roles of `ArchSpec.lora_target`)."""

SHARED_INPUT_ROLES = ("query", "key", "value")
"""Roles that read the same input: where the recipe stacks them (`Int8Recipe.stacked_qkv`), smoothed by one
common s (from their weights' joint column maxima, as SmoothQuant does for Q/K/V) so that they run as one
int8 matmul (`int8.StackedInt8`), at strength `STACKED_ALPHA`."""

STACKED_ALPHA = 0.9
"""The stacked query/key/value's smoothing strength: one s for three weights has its lowest error at a higher
strength than each alone (docs/accuracy.md)."""


def calibration_texts() -> list[str]:
    text = resources.files("service.modeling").joinpath("calibration.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip() and not line.startswith("#")]


@torch.inference_mode()
def input_maxima(model: nn.Module, tokenizer: PreTrainedTokenizerBase, linears: dict[str, nn.Linear],
                 texts: list[str], batch: int = 32, max_length: int = 128) -> dict[str, torch.Tensor]:
    """max |x_j| over every token of `texts`, per input channel j of each of `linears` (path -> module)."""
    maxima: dict[str, torch.Tensor] = {}

    def hook(path: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...], torch.Tensor], None]:
        def record(_module: nn.Module, inputs: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).abs().amax(0).float()
            maxima[path] = torch.maximum(maxima[path], x) if path in maxima else x
        return record

    handles = [m.register_forward_hook(hook(path)) for path, m in linears.items()]
    try:
        for i in range(0, len(texts), batch):
            enc = tokenizer(texts[i : i + batch], padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt")
            model(**{k: v.to(next(model.parameters()).device) for k, v in enc.items()})
    finally:
        for h in handles:
            h.remove()
    return maxima


def smoothing_factors(input_max: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """s [in] for one linear layer: max|x_j|^a / max|W_:j|^(1-a), both floored at 1e-5."""
    s = input_max.clamp(min=1e-5) ** alpha / weight.detach().abs().amax(0).float().clamp(min=1e-5) ** (1 - alpha)
    return s.clamp(min=1e-5)


def quantize_smoothed(model: nn.Module, tokenizer: PreTrainedTokenizerBase, spec: ArchSpec, *,
                      ffn_out_dtype: torch.dtype = torch.float32) -> int:
    """Apply the recipe for `ffn_out_dtype` (`int8.RECIPES`) to every layer of the frozen float32 `model`, in
    place: the `ALPHAS` roles smoothed and replaced by int8 layers (`int8.int8_projections`; 8-bit activations
    where the CPU has AVX512-VNNI), the feed-forward output held in `ffn_out_dtype`. Returns how many
    projections are int8."""
    full_range = full_range_activations(cpu_flags())
    recipe = RECIPES[ffn_out_dtype]
    stacked = SHARED_INPUT_ROLES if recipe.stacked_qkv else ()
    groups: list[tuple[float, dict[str, nn.Linear]]] = []  # one smoothing (and one int8 matmul) per group
    for i, layer in enumerate(get_layers(model, spec)):
        members = []  # (role, alpha, path, module) of the layer's projections still plain float
        for role, alpha in ALPHAS.items():
            module = get_submodule(layer, spec.lora_target(role))
            if type(module) is nn.Linear:
                members.append((role, alpha, f"{spec.layers}.{i}.{spec.lora_target(role)}", module))
        together = {path: module for role, _, path, module in members if role in stacked}
        if len(together) < 2:  # nothing to stack with: each its own role's smoothing
            together = {}
        else:
            groups.append((STACKED_ALPHA, together))
        groups += [(alpha, {path: module}) for _, alpha, path, module in members if path not in together]
        ffn_out = get_submodule(layer, spec.lora_target("ffn_out"))
        if ffn_out_dtype != torch.float32 and type(ffn_out) is nn.Linear:
            set_submodule(layer, spec.lora_target("ffn_out"), CastLinear(ffn_out, ffn_out_dtype))
    linears = {path: m for _, group in groups for path, m in group.items()}
    maxima = input_maxima(model, tokenizer, linears, calibration_texts())
    for alpha, group in groups:
        input_max = torch.stack([maxima[p] for p in group]).amax(0)  # one input: the same maxima, up to hooks
        s = smoothing_factors(input_max, torch.cat([m.weight for m in group.values()]), alpha)
        layers = int8_projections([m.weight.detach().float() * s for m in group.values()],
                                  [m.bias for m in group.values()], 1.0 / s, full_range=full_range,
                                  onednn=recipe.onednn)
        for path, layer in zip(group, layers):
            set_submodule(model, path, layer)
    return len(linears)
