"""Random bundles with the right layout: for tests, benchmarks and load generation (not for serving users)."""

from __future__ import annotations

import torch

from service.bundles.layout import expected_shapes
from service.bundles.manifest import Manifest


def random_tensors(manifest: Manifest, seed: int = 0, std: float = 0.05) -> dict[str, torch.Tensor]:
    """Every tensor `manifest` requires, drawn from N(0, std) with a fixed seed (norm weights near 1)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in sorted(expected_shapes(manifest).items()):
        t = torch.randn(shape, generator=gen) * std
        if name.endswith("norm.weight"):
            t += 1.0
        out[name] = t
    return out
