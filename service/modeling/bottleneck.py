"""Bottleneck adapters (Houlsby et al. 2019): `h + up(act(down(h)))` after a sublayer's output projection.

This module holds the maths and the trainable single-task form used by training; the serving form, where
many tasks share one forward, is `slot_pool.py`. Both read and write the same bundle tensor names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from service.bundles.layout import adapter_key
from service.bundles.manifest import Activation, AdapterConfig
from service.modeling.backbone import ArchSpec, get_layers, get_submodule, set_submodule

ACTIVATIONS: dict[Activation, Callable[[torch.Tensor], torch.Tensor]] = {
    Activation.GELU: F.gelu,
    Activation.RELU: F.relu,
    Activation.SWISH: F.silu,
}


class XW(nn.Module):
    """Affine map in the `x @ weight + bias` convention (weight [in, out]), matching the bundle layout."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d_in, d_out))  # [in, out]
        self.bias = nn.Parameter(torch.zeros(d_out))  # [out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, self.weight) + self.bias


class BottleneckAdapter(nn.Module):
    """One adapter `d -> m -> d` with a skip connection: 2md + d + m parameters.

    Near-identity at init: the up-projection starts at zero (or ~N(0, up_init_std) when asked), so an
    untrained adapter leaves its sublayer's output (almost) unchanged.
    """

    def __init__(
        self, hidden: int, bottleneck: int, activation: Activation = Activation.GELU,
        down_init_std: float = 1e-2, up_init_std: float = 0.0,
    ):
        super().__init__()
        self.down = XW(hidden, bottleneck)
        self.up = XW(bottleneck, hidden)
        self.activation = Activation(activation)
        nn.init.normal_(self.down.weight, std=down_init_std)
        if up_init_std > 0:
            nn.init.normal_(self.up.weight, std=up_init_std)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # [..., d] -> [..., d]
        out: torch.Tensor = h + self.up(ACTIVATIONS[self.activation](self.down(h)))
        return out


class AdaptedProjection(nn.Module):
    """A frozen output projection followed by one task's adapter (training and single-task use)."""

    def __init__(self, base: nn.Module, adapter: BottleneckAdapter):
        super().__init__()
        self.base = base
        self.adapter = adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.adapter(self.base(x))
        return out


def attach_adapters(
    model: nn.Module, spec: ArchSpec, cfg: AdapterConfig, hidden: int, up_init_std: float = 0.0,
) -> dict[str, nn.Module]:
    """Insert one task's adapters into `model` in place (and trainable LayerNorm copies if asked).

    Returns the new trainable modules keyed by bundle prefix (`adapter.{layer}.{point}` and
    `adapter.{layer}.{point}.norm`), so their tensors export straight into a bundle.
    """
    added: dict[str, nn.Module] = {}
    layers = get_layers(model, spec)
    for i, layer in enumerate(layers):
        for point in cfg.points:
            base = get_submodule(layer, spec.projection(point))
            ref = next(base.parameters())
            adapter = BottleneckAdapter(hidden, cfg.bottleneck, cfg.activation, up_init_std=up_init_std)
            adapter.to(device=ref.device, dtype=ref.dtype)
            set_submodule(layer, spec.projection(point), AdaptedProjection(base, adapter))
            added[f"adapter.{i}.{point}"] = adapter
            if cfg.train_layernorm:
                # cast: at `spec.norm(point)` every supported architecture has an nn.LayerNorm
                norm = cast(nn.LayerNorm, get_submodule(layer, spec.norm(point)))
                trainable = _copy_layer_norm(norm)
                set_submodule(layer, spec.norm(point), trainable)
                added[f"adapter.{i}.{point}.norm"] = trainable
    return added


def adapter_tensors(added: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Bundle tensors (layout names) of modules returned by `attach_adapters`."""
    out: dict[str, torch.Tensor] = {}
    for prefix, module in added.items():
        for name, p in module.named_parameters():
            out[f"{prefix}.{name}"] = p.detach().float().cpu().clone()
    return out


def load_adapter_tensors(added: dict[str, nn.Module], tensors: dict[str, torch.Tensor]) -> None:
    """Inverse of `adapter_tensors`: copy bundle tensors into attached modules."""
    for prefix, module in added.items():
        for name, p in module.named_parameters():
            with torch.no_grad():
                p.copy_(tensors[f"{prefix}.{name}"].to(p.dtype))


def _copy_layer_norm(norm: nn.LayerNorm) -> nn.LayerNorm:
    shape = norm.weight.shape
    eps = getattr(norm, "eps", 1e-12)
    clone = nn.LayerNorm(shape, eps=eps).to(device=norm.weight.device, dtype=norm.weight.dtype)
    with torch.no_grad():
        clone.weight.copy_(norm.weight)
        clone.bias.copy_(norm.bias)
    return clone


__all__ = [
    "ACTIVATIONS", "AdaptedProjection", "BottleneckAdapter", "XW", "adapter_key", "adapter_tensors",
    "attach_adapters", "load_adapter_tensors",
]
