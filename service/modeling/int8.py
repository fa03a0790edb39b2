"""The `int8` mode's kernel: a linear layer with int8 weights and per-token dynamically quantised activations.

Maths, for an input x [N, in] and a float weight W [out, in] with bias b:

    x_s = x * inv_scale                      (SmoothQuant smoothing, `service.modeling.smoothing`; 1 when unset)
    r_i = max_j |x_s[i, j]|                  (one scale per token: each row's own range)
    y   = r * int8_gemm(x_s / r, Q(W diag(s))) + b

where Q quantises each output channel of the smoothed weight to int8 (symmetric, one scale per channel) and
int8_gemm quantises its input to 8 bits, multiplies with the CPU's int8 dot products into int32 accumulators
and dequantises to float32. Dividing every row by its own maximum first gives each token the whole 8-bit
range (per-token quantisation, as ZeroQuant and LLM.int8 do); the rescale after the matmul is exact, since
the matmul is linear in each row. A token with huge activations ([CLS], [SEP]) no longer coarsens every other
token's grid, and a row's result hardly depends on the rows batched with it.

Two kernels compute int8_gemm (one object per kernel, `Int8Kernel`), chosen per layer when it is built (and
by the mode's recipe, `Int8Recipe`):
- `OneDnnKernel` where the CPU has AVX512-VNNI (`full_range`) and oneDNN's int8 linear runs here: the row is
  quantised here, symmetric, to uint8 around 128 (`q = round(127 x_s / r) + 128`, all 8 bits), and oneDNN
  multiplies it with the prepacked weight (`torch.ops.onednn.qlinear_pointwise`, the kernel `torch.compile`'s
  x86 int8 path calls: VNNI, or AMX-INT8 where the CPU has it). Its per-call cost is a fraction of fbgemm's
  dynamic linear's on MiniLM's small matrices (docs/benchmarks.md, session 10).
- `FbgemmKernel` elsewhere: PyTorch's dynamic quantised linear (fbgemm), which takes x_s / r, quantises it
  with one scale for the call and, without `full_range`, to 7 bits (`reduce_range`), so that a pair of
  uint8 x int8 products summed into int16 (AVX2's `vpmaddubsw`, also fbgemm's path on CPUs with AVX-VNNI but
  no AVX-512) cannot saturate. With AVX512-VNNI products go straight into int32 and take the full 8 bits:
  half the rounding step, 2.8x less error in the int8 model (docs/accuracy.md).

Query, key and value read the same input: where the recipe says so they run as one `StackedInt8`, their weights stacked into one
matrix, the input quantised once and multiplied once for the three (the smoothing gives them one common
`inv_scale` for that, `service.modeling.smoothing`); each `StackedInt8Linear` takes its columns.

The packed weights are opaque kernel objects, not in `state_dict()`: an `Int8Linear` is built once from float
weights at load time and never saved, trained or cast (`.to(dtype)` would cast only its float32 `inv_scale`
and `bias`).
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from service.modeling.onednn import prepack

VNNI_FLAGS = ("avx512_vnni",)
"""CPU flags under which int8 dot products accumulate in int32 without an int16 step (no saturation).
fbgemm has no AVX-VNNI (256-bit) kernels: such CPUs run its AVX2 path. Every CPU with AMX-INT8 has
AVX512-VNNI too."""


def full_range_activations(flags: frozenset[str]) -> bool:
    """True where activations may use all 8 bits without saturating: the CPU has AVX512-VNNI."""
    return any(flag in flags for flag in VNNI_FLAGS)


def _channel_scales(weight: torch.Tensor) -> torch.Tensor:
    """The symmetric int8 grid of `weight` [out, in]: one scale per output channel, max |row| / 127."""
    return (weight.abs().amax(1) / 127.0).clamp(min=1e-12)


class Int8Kernel(Protocol):
    """int8_gemm of the module docstring, split in two so that layers sharing an input quantise it once.

    `quantize(x)`: x [N, in] float32 (smoothed) -> (the kernel's operand, c [N, 1] float32);
    `matmul(operand)` -> z [N, out] float32 with  x W^T ~= c * z  (per row), W the float weight it was built from.
    """

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def matmul(self, operand: torch.Tensor) -> torch.Tensor: ...


class OneDnnKernel:
    """oneDNN's int8 linear on a row-wise symmetric uint8 operand (zero point 128): see the module docstring."""

    ZERO_POINT = 128

    def __init__(self, weight: torch.Tensor):
        w = weight.float()
        self.scales = _channel_scales(w)
        qweight = torch.round(w / self.scales[:, None]).clamp_(-127, 127).to(torch.int8)
        self.packed = torch.ops.onednn.qlinear_prepack(qweight, None)
        self.zero_points = torch.zeros(weight.shape[0], dtype=torch.long)

    @staticmethod
    def available() -> bool:
        """This PyTorch build has oneDNN's int8 linear and this CPU AVX512-VNNI (elsewhere oneDNN's int8 products
        can saturate on 8-bit activations, as fbgemm's AVX2 path would)."""
        from service.modeling.precision import cpu_flags  # precision imports this module lazily: no cycle

        return (torch.backends.mkldnn.is_available()  # type: ignore[no-untyped-call]
                and hasattr(torch.ops.onednn, "qlinear_pointwise") and hasattr(torch.ops.onednn, "qlinear_prepack")
                and full_range_activations(cpu_flags()))

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # max |x| per row from two reductions (no |x| tensor written); + 128.5 then truncation = round half up
        r = torch.maximum(x.amax(-1, keepdim=True), x.amin(-1, keepdim=True).neg_()).clamp_(min=1e-12)
        q = x.mul(127.0 / r).add_(self.ZERO_POINT + 0.5).to(torch.uint8)
        return q, r.div_(127.0)

    def matmul(self, operand: torch.Tensor) -> torch.Tensor:
        z: torch.Tensor = torch.ops.onednn.qlinear_pointwise(
            operand, 1.0, self.ZERO_POINT, self.packed, self.scales, self.zero_points, None, 1.0, 0, torch.float32,
            "none", [], "")
        return z


class FbgemmKernel:
    """PyTorch's dynamic quantised linear (fbgemm) on the row-normalised input: see the module docstring."""

    def __init__(self, weight: torch.Tensor, *, full_range: bool):
        w = weight.float()
        scales = _channel_scales(w)
        zeros = torch.zeros_like(scales, dtype=torch.long)
        with warnings.catch_warnings():  # torch 2.13 marks quantised tensor creation as deprecated
            warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*deprecated")
            qtensor = torch.quantize_per_channel(w, scales.double(), zeros, 0, torch.qint8)
        self.packed = torch.ops.quantized.linear_prepack(qtensor, None)
        self.full_range = full_range

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = x.abs().amax(-1, keepdim=True).clamp_(min=1e-12)
        return x / r, r

    def matmul(self, operand: torch.Tensor) -> torch.Tensor:
        z: torch.Tensor = torch.ops.quantized.linear_dynamic(operand, self.packed, reduce_range=not self.full_range)
        return z


@dataclass(frozen=True)
class Int8Recipe:
    """How the `int8` mode builds its layers, by the dtype of the feed-forward output projection (the one it
    keeps out of int8; the key of `RECIPES`). Each recipe is the one recorded within the accuracy gate with that
    dtype (docs/accuracy.md): the oneDNN kernel's symmetric per-token grid with a bfloat16 feed-forward output
    cost MRPC one dev pair too many, so that combination keeps fbgemm's kernel and per-role smoothing."""

    onednn: bool
    """`OneDnnKernel` where the CPU allows it (`build_kernel`); else `FbgemmKernel` everywhere."""
    stacked_qkv: bool
    """Query, key and value as one `StackedInt8` under one smoothing; else three `Int8Linear`s."""


RECIPES = {
    torch.float32: Int8Recipe(onednn=True, stacked_qkv=True),
    torch.bfloat16: Int8Recipe(onednn=False, stacked_qkv=False),
}
"""The recipe per feed-forward output dtype (see `Int8Recipe`)."""


def build_kernel(weight: torch.Tensor, *, full_range: bool, onednn: bool = True) -> Int8Kernel:
    """The kernel for `weight` [out, in] on this CPU: with `onednn`, oneDNN's where it may use all 8 bits and
    its result agrees with fbgemm's on a few random rows (checked once per layer); else fbgemm's."""
    fbgemm = FbgemmKernel(weight, full_range=full_range)
    if not (onednn and full_range and OneDnnKernel.available()):
        return fbgemm
    try:
        kernel = OneDnnKernel(weight)
        x = torch.randn(3, weight.shape[1], generator=torch.Generator().manual_seed(0))
        got, want = (k.matmul(q) * c for k in (kernel, fbgemm) for q, c in [k.quantize(x)])
        agrees = bool(((got - want).norm() <= 0.05 * want.norm()).item())
    except (RuntimeError, AttributeError, TypeError):  # an op missing or changed in this PyTorch build
        return fbgemm
    return kernel if agrees else fbgemm


class Int8Linear(nn.Module):
    """A frozen linear layer computed in int8 with per-token activation scales (see the module docstring).

    Built from a float weight [out, in] (already multiplied by the smoothing factors), its float bias and
    `inv_scale` [in] (the smoothing's 1 / s; None for no smoothing). Keeps `in_features` / `out_features`, so
    the routed wrappers (adapters, LoRA) wrap it as they wrap a plain `nn.Linear`."""

    inv_scale: torch.Tensor | None
    bias: torch.Tensor | None

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, inv_scale: torch.Tensor | None,
                 *, full_range: bool, onednn: bool = True):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.kernel = build_kernel(weight.detach(), full_range=full_range, onednn=onednn)
        self.register_buffer("inv_scale", None if inv_scale is None else inv_scale.detach().float().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.full_range = full_range

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _smoothed_int8(self.kernel, x.reshape(-1, self.in_features), self.inv_scale, self.bias)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"smoothed={self.inv_scale is not None}, full_range={self.full_range}, "
                f"kernel={type(self.kernel).__name__}")


def _smoothed_int8(kernel: Int8Kernel, x: torch.Tensor, inv_scale: torch.Tensor | None,
                   bias: torch.Tensor | None) -> torch.Tensor:
    """x [N, in] -> x W^T + b through `kernel`: smoothed (x / s), quantised per token, multiplied, then each row's
    scale put back (c * z + bias)."""
    operand, c = kernel.quantize(x if inv_scale is None else x * inv_scale)
    z = kernel.matmul(operand)
    return z.mul(c) if bias is None else torch.addcmul(bias, z, c)


class StackedInt8:
    """Several projections of one input (a layer's query, key and value) as one int8 matmul: their smoothed
    weights stacked `[sum out, in]` under one `inv_scale`, their biases stacked, the input quantised, multiplied
    and rescaled once into one `[N, sum out]` result; each projection (`StackedInt8Linear`) answers a view of
    its columns (so a reader that adds into its output in place, as LoRA does, touches only its own). The
    first of them to run computes the result, the others take it: per thread (forwards run on several
    threads), and kept only until each has had it, so a later forward never reads a stale result (a different
    input tensor always recomputes)."""

    def __init__(self, weights: list[torch.Tensor], biases: list[torch.Tensor | None], inv_scale: torch.Tensor | None,
                 *, full_range: bool, onednn: bool = True):
        self.kernel = build_kernel(torch.cat([w.detach() for w in weights]), full_range=full_range, onednn=onednn)
        self.inv_scale = None if inv_scale is None else inv_scale.detach().float().clone()
        self.bias = torch.cat([torch.zeros(w.shape[0]) if b is None else b.detach().float()
                               for w, b in zip(weights, biases)])
        self.bounds = [0]
        for w in weights:
            self.bounds.append(self.bounds[-1] + w.shape[0])
        self.in_features = weights[0].shape[1]
        self._local = threading.local()

    def product(self, x: torch.Tensor) -> torch.Tensor:
        """y [N, sum out] = x W^T + b of every stacked projection, for input x [..., in]: computed once per input."""
        held: tuple[torch.Tensor, torch.Tensor, int] | None = getattr(self._local, "held", None)
        if held is not None and held[0] is x:
            _, y, left = held
            self._local.held = (x, y, left - 1) if left > 1 else None
            return y
        y = _smoothed_int8(self.kernel, x.reshape(-1, self.in_features), self.inv_scale, self.bias)
        readers = len(self.bounds) - 1
        self._local.held = (x, y, readers - 1) if readers > 1 else None
        return y


class StackedInt8Linear(nn.Module):
    """Projection `index` of a `StackedInt8`: a view of its columns of the stacked result."""

    def __init__(self, stack: StackedInt8, index: int):
        super().__init__()
        self.stack, self.index = stack, index
        self.lo, self.hi = stack.bounds[index], stack.bounds[index + 1]
        self.in_features, self.out_features = stack.in_features, self.hi - self.lo

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stack.product(x)[:, self.lo : self.hi].view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, stacked={self.index} of "
                f"{len(self.stack.bounds) - 1}, kernel={type(self.stack.kernel).__name__}")


def int8_projections(weights: list[torch.Tensor], biases: list[torch.Tensor | None], inv_scale: torch.Tensor | None,
                     *, full_range: bool, onednn: bool) -> list[nn.Module]:
    """The int8 layers of projections that share one input and one smoothing (weights already multiplied by it,
    `inv_scale` its 1 / s): one `Int8Linear` for a single projection, else one `StackedInt8`'s views, in order."""
    if len(weights) == 1:
        return [Int8Linear(weights[0], biases[0], inv_scale, full_range=full_range, onednn=onednn)]
    stack = StackedInt8(weights, biases, inv_scale, full_range=full_range, onednn=onednn)
    return [StackedInt8Linear(stack, index) for index in range(len(weights))]


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
