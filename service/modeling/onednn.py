"""Frozen bfloat16 linear layers with their weights prepacked for oneDNN, on CPU.

Maths: y = x W^T + b, `nn.Linear`'s in bfloat16 (bit for bit in the tests: per layer at MiniLM's widths up to
700 rows, and a tiny BERT end to end; `prepack` checks each layer once and keeps `nn.Linear` if it differs).

Why: PyTorch's eager bfloat16 linear on CPU hands oneDNN the plain `[out, in]` weight on every call, and
oneDNN reorders it into the blocked layout its AMX and AVX512-BF16 kernels read, every call. The backbone's
weights never change, so `PrepackedLinear` reorders each once, at load time, and calls oneDNN's linear on the
packed weight (`torch.ops.mkldnn._reorder_linear_weight` / `_linear_pointwise`: the path `torch.compile`'s
freezing takes for frozen CPU linears). The gain, measured side by side, is in docs/benchmarks.md.

The packed weight is an opaque oneDNN tensor, not in `state_dict()`: a `PrepackedLinear` is built once at
load time and never saved, trained or cast (as `Int8Linear`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BATCH_HINT = 512
"""Rows (tokens) oneDNN is told to expect when it picks the packed layout; any row count runs on it."""


def available() -> bool:
    """Whether this PyTorch build has oneDNN's prepacked linear (CPU builds with MKLDNN do)."""
    return (torch.backends.mkldnn.is_available()  # type: ignore[no-untyped-call]
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


class PrepackedLinear(nn.Module):
    """A frozen bfloat16 linear layer whose weight oneDNN reordered once (see the module docstring). Keeps
    `in_features` / `out_features`, so the routed wrappers (adapters, LoRA) wrap it as a plain `nn.Linear`."""

    bias: torch.Tensor | None

    def __init__(self, linear: nn.Linear, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().to(dtype)
        self._packed = torch.ops.mkldnn._reorder_linear_weight(weight, BATCH_HINT)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(dtype).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, prepacked=True"


def prepack(linear: nn.Linear, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """`linear` as a `PrepackedLinear` in `dtype`, or as it is where oneDNN cannot pack it (CPUs without the
    AVX-512 or AVX-NE-CONVERT instructions its bfloat16 kernels need) or where the packed layer would not give
    `F.linear`'s result (checked once per layer on a few random rows)."""
    if not available():
        return linear
    try:
        packed = PrepackedLinear(linear, dtype)
        x = torch.randn(3, linear.in_features, generator=torch.Generator().manual_seed(0)).to(dtype)
        bias = None if linear.bias is None else linear.bias.detach().to(dtype)
        same = torch.equal(packed(x), F.linear(x, linear.weight.detach().to(dtype), bias))
    except RuntimeError:
        return linear
    return packed if same else linear
