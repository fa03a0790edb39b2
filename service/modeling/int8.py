"""The `int8` mode's kernel: a linear layer with int8 weights and per-token dynamically quantised activations.

Maths, for an input x [N, in] and a float weight W [out, in] with bias b:

    x_s = x * inv_scale                      (SmoothQuant smoothing, `service.modeling.smoothing`; 1 when unset)
    r_i = max_j |x_s[i, j]|                  (one scale per token: each row's own range)
    y   = r * int8_gemm(x_s / r, Q(W diag(s))) + b

where Q quantises each output channel of the smoothed weight to int8 (symmetric, one scale per channel), and
int8_gemm is PyTorch's dynamic quantised linear (fbgemm on x86): it quantises its input to uint8 with one scale
for the whole call, multiplies with VNNI dot products into int32 accumulators and dequantises to float32.
Dividing every row by its own maximum first gives each token the whole 8-bit range (per-token quantisation,
as ZeroQuant and LLM.int8 do) through a kernel that only offers one scale per call; the rescale after the
matmul is exact, since the matmul is linear in each row. A token with huge activations ([CLS], [SEP]) no
longer coarsens every other token's grid, and a row's result hardly depends on the rows batched with it.

`full_range`: fbgemm quantises activations to 7 bits by default (`reduce_range`), so that a pair of
uint8 x int8 products summed into int16 (AVX2's `vpmaddubsw`, also fbgemm's path on CPUs with AVX-VNNI but
no AVX-512) cannot saturate. Its AVX512-VNNI kernels multiply straight into int32 and take the full 8 bits:
half the rounding step, 2.8x less error in the int8 model (docs/accuracy.md).

The weights live in fbgemm's packed form (`_packed`), not in `state_dict()`: an `Int8Linear` is built once
from float weights at load time and never saved, trained or cast (`.to(dtype)` would cast only its float32
`inv_scale` and `bias`).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from service.modeling.onednn import prepack

VNNI_FLAGS = ("avx512_vnni",)
"""CPU flags under which fbgemm's int8 dot products accumulate in int32 without an int16 step (no saturation).
fbgemm has no AVX-VNNI (256-bit) kernels: such CPUs run its AVX2 path. Every CPU with AMX-INT8 has
AVX512-VNNI too."""


def full_range_activations(flags: frozenset[str]) -> bool:
    """True where fbgemm's activations may use all 8 bits without saturating: the CPU has AVX512-VNNI."""
    return any(flag in flags for flag in VNNI_FLAGS)


class Int8Linear(nn.Module):
    """A frozen linear layer computed in int8 with per-token activation scales (see the module docstring).

    Built from a float weight [out, in] (already multiplied by the smoothing factors), its float bias and
    `inv_scale` [in] (the smoothing's 1 / s; None for no smoothing). Keeps `in_features` / `out_features`, so
    the routed wrappers (adapters, LoRA) wrap it as they wrap a plain `nn.Linear`."""

    inv_scale: torch.Tensor | None
    bias: torch.Tensor | None

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, inv_scale: torch.Tensor | None,
                 *, full_range: bool):
        super().__init__()
        w = weight.detach().float()
        self.out_features, self.in_features = w.shape
        scales = (w.abs().amax(1) / 127.0).clamp(min=1e-12).double()
        with warnings.catch_warnings():  # torch 2.13 marks quantised tensor creation as deprecated
            warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*deprecated")
            qweight = torch.quantize_per_channel(w, scales, torch.zeros_like(scales, dtype=torch.long), 0,
                                                 torch.qint8)
        self._packed = torch.ops.quantized.linear_prepack(qweight, None)
        self.register_buffer("inv_scale", None if inv_scale is None else inv_scale.detach().float().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.full_range = full_range

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inv_scale is not None:
            x = x * self.inv_scale
        r = x.abs().amax(-1, keepdim=True).clamp_(min=1e-12)
        y = torch.ops.quantized.linear_dynamic(x / r, self._packed, reduce_range=not self.full_range)
        return y * r if self.bias is None else torch.addcmul(self.bias, y, r)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"smoothed={self.inv_scale is not None}, full_range={self.full_range}")


class CastLinear(nn.Module):
    """A frozen linear layer whose weight is held, and whose matmul runs, in `dtype` (bfloat16): the input is cast
    to it and the output back to the input's dtype. The `int8` mode's feed-forward output projection on CPUs
    that compute bfloat16 fast (see `service.modeling.smoothing`)."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype):
        super().__init__()
        inner = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                          dtype=dtype, device=linear.weight.device).requires_grad_(False)
        with torch.no_grad():
            inner.weight.copy_(linear.weight)
            if linear.bias is not None:
                inner.bias.copy_(linear.bias)
        # on CPU, its weight prepacked for oneDNN once (service.modeling.onednn): the same result, no reorder per call
        self.inner = prepack(inner, dtype) if inner.weight.device.type == "cpu" and dtype == torch.bfloat16 else inner
        self.dtype = dtype
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.inner(x.to(self.dtype))
        return y.to(x.dtype)
