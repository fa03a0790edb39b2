"""The `int8` mode's recipe: smoothed int8 projections, the feed-forward output kept in float32.

PyTorch's dynamic quantisation (fbgemm/x86, VNNI dot products) gives each linear layer int8 weights with one
scale per output channel, and quantises its input with ONE scale per batch. Transformer activations have a few
channels far larger than the rest, so one scale loses the small channels: on the packaged MiniLM that cost up
to 1.7 points on the shipped tasks (docs/accuracy.md). Two changes bring it within the accuracy gate:

- Smoothing (SmoothQuant, Xiao et al. 2023, arXiv:2211.10438). For y = x W^T + b and any s > 0,
  y = (x / s) (W diag(s))^T + b exactly; with s_j = max|x_j|^a / max|W_:j|^(1-a), the per-channel maxima
  max|x_j| calibrated once at start-up on `calibration.txt` (train-split texts), the activation's outlier
  channels shrink and the weight's columns take up the difference, where per-channel weight scales absorb it.
  `a` per role: 0.5 for query/key/value and the attention output, 0.8 for the feed-forward inner projection
  (whose input, a LayerNorm output, carries the strongest outliers).
- The feed-forward output projection (input: the GELU output, heavy-tailed per token) stays float32: its
  quantisation was three quarters of the remaining error.

The backbone stays frozen and its fingerprint is computed before this runs, so float32-trained bundles match.
`SmoothedLinear` keeps `in_features` / `out_features`, and the routed wrappers (adapters, LoRA) wrap it as they
wrap a plain linear: they see the unsmoothed input and output.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources
from typing import TYPE_CHECKING

import torch
from torch import nn

from service.modeling.backbone import ArchSpec, get_layers, get_submodule, set_submodule
from service.modeling.precision import quantize_int8

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

ALPHAS = {"query": 0.5, "key": 0.5, "value": 0.5, "attn_out": 0.5, "ffn_in": 0.8}
"""Smoothing strength per projection role (the roles of `ArchSpec.lora_target`); ffn_out is not quantised."""


class SmoothedLinear(nn.Module):
    """`inner(x * inv_scale)`: a linear layer whose weight columns were multiplied by 1 / inv_scale."""

    inv_scale: torch.Tensor

    def __init__(self, inner: nn.Module, inv_scale: torch.Tensor, in_features: int, out_features: int):
        super().__init__()
        self.inner = inner
        self.register_buffer("inv_scale", inv_scale)
        self.in_features, self.out_features = in_features, out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.inner(x * self.inv_scale)
        return y


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


def quantize_smoothed(model: nn.Module, tokenizer: PreTrainedTokenizerBase, spec: ArchSpec) -> int:
    """Smooth and int8-quantise the query/key/value, attention output and feed-forward inner projections of
    every layer of the frozen float32 `model`, in place; the feed-forward output stays float32. Returns how
    many projections were quantised."""

    linears: dict[str, tuple[nn.Linear, float]] = {}
    for i, layer in enumerate(get_layers(model, spec)):
        for role, alpha in ALPHAS.items():
            module = get_submodule(layer, spec.lora_target(role))
            if type(module) is nn.Linear:
                linears[f"{spec.layers}.{i}.{spec.lora_target(role)}"] = (module, alpha)
    maxima = input_maxima(model, tokenizer, {p: m for p, (m, _) in linears.items()}, calibration_texts())
    for path, (linear, alpha) in linears.items():
        w = linear.weight.data
        s = (maxima[path].clamp(min=1e-5) ** alpha / w.abs().amax(0).float().clamp(min=1e-5) ** (1 - alpha))
        s = s.clamp(min=1e-5)
        linear.weight.data = (w.float() * s).to(w.dtype)
        set_submodule(model, path, SmoothedLinear(linear, (1.0 / s).to(w.dtype), linear.in_features,
                                                  linear.out_features))
    quantize_int8(model, (f"{path}.inner" for path in linears))
    return len(linears)
