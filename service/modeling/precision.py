"""Compute precision: which number format the frozen backbone computes in, chosen once per device.

Modes (`ADAPTER_SERVICE_DTYPE`):
- `float32`, `float16` (CUDA only), `bfloat16`: the backbone's weights and activations in that format.
- `int8`: the backbone's query/key/value, attention output and feed-forward inner projections hold int8
  weights (one scale per output channel) and quantise their smoothed input per batch (PyTorch's dynamic
  quantisation, fbgemm/x86 kernels with VNNI dot products; the recipe: `service.modeling.smoothing`);
  everything else (embeddings, attention, the feed-forward output, LayerNorm, adapters, heads) float32. CPU
  only.
- `auto`: the fastest mode whose accuracy stays within the gate of docs/accuracy.md (0.5 points of
  float32 on every shipped task): CUDA: bfloat16 where the GPU computes it natively (compute capability
  >= 8.0), else float16. CPU: bfloat16 where the CPU has bfloat16 instructions (AMX-BF16 or AVX512-BF16)
  *and* a short measured probe at start-up finds a bfloat16 matmul of the backbone's kind at least
  `BF16_MIN_SPEEDUP` times as fast as float32, else float32. The flags alone do not decide: on a VM whose
  CPU reports `avx512_bf16` without AMX, PyTorch's bfloat16 matmuls ran at half the float32 speed
  (docs/benchmarks.md, session 5). Where bfloat16 is not fast, `int8` when the backbone's int8 accuracy
  is recorded within the gate (`int8_gated`, `backbone.INT8_GATED_BACKBONES`: none yet, see docs/accuracy.md)
  and its probe measures it at least `INT8_MIN_SPEEDUP` times as fast as float32; else float32.

Adapter and head weights stay float32 in bundles; the cache casts them to the compute dtype when it loads
them (float32 under `int8`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

MODES = ("auto", "float32", "float16", "bfloat16", "int8")


@dataclass(frozen=True)
class Precision:
    """The chosen compute mode: its name, the dtype of activations (and non-quantised weights), and why."""

    mode: str  # float32 | float16 | bfloat16 | int8
    dtype: torch.dtype
    reason: str

    @property
    def quantized(self) -> bool:
        return self.mode == "int8"


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bf16_cpu(flags: frozenset[str] | None = None) -> str | None:
    """The CPU feature that computes bfloat16 natively (`amx_bf16` or `avx512_bf16`), or None."""
    flags = cpu_flags() if flags is None else flags
    for flag in ("amx_bf16", "avx512_bf16"):
        if flag in flags:
            return flag
    return None


BF16_MIN_SPEEDUP = 1.2
"""`auto` takes bfloat16 on a CPU only when the probe measures it at least this much faster than float32."""


def _speed_ratio(baseline: Callable[[], object], candidate: Callable[[], object], reps: int) -> float:
    """baseline time / candidate time: the median of `reps` timed calls each, after two warm-up calls."""
    import time

    times = []
    for run in (baseline, candidate):
        for _ in range(2):
            run()
        samples = []
        for _ in range(reps):
            t0 = time.perf_counter()
            run()
            samples.append(time.perf_counter() - t0)
        times.append(sorted(samples)[reps // 2])
    return times[0] / max(times[1], 1e-9)


def bf16_speedup(tokens: int = 256, hidden: int = 384, reps: int = 6) -> float:
    """float32 time / bfloat16 time of one linear layer `[tokens, hidden] -> [tokens, 4 hidden]` (a
    transformer's feed-forward inner projection) on this CPU, with the threads torch has now: the median of
    `reps` timed calls each, after two warm-up calls (about 30 ms on a 2-core VM)."""
    x = torch.randn(tokens, hidden)
    w = torch.randn(4 * hidden, hidden)
    x16, w16 = x.to(torch.bfloat16), w.to(torch.bfloat16)
    return _speed_ratio(lambda: torch.nn.functional.linear(x, w), lambda: torch.nn.functional.linear(x16, w16), reps)


INT8_MIN_SPEEDUP = 1.2
"""`auto` takes int8 (where bfloat16 is not fast) only when its probe is at least this much faster."""


def quantize_int8(model: torch.nn.Module, paths: Iterable[str]) -> None:
    """Dynamic int8, in place, for the linear layers at `paths` in `model`: int8 weights with one scale per
    output channel, activations quantised at each call (PyTorch's fbgemm / oneDNN kernels, VNNI dot products
    where the CPU has them). The one place the `int8` mode and its speed probe quantise."""
    import warnings

    import torch.ao.quantization as tq

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*deprecated")
        # torch leaves quantize_dynamic unannotated, and strict mode refuses calls to untyped functions
        tq.quantize_dynamic(  # type: ignore[no-untyped-call]
            model, dict.fromkeys(paths, tq.per_channel_dynamic_qconfig), dtype=torch.qint8, inplace=True)


def int8_speedup(tokens: int = 256, hidden: int = 384, reps: int = 6) -> float:
    """float32 time / int8 time of the same linear layer as `bf16_speedup`, the int8 one quantised as the
    `int8` mode runs it (`quantize_int8`, with its smoothing multiply): the median of `reps` timed calls each."""
    x = torch.randn(tokens, hidden)
    linear = torch.nn.Linear(hidden, 4 * hidden).eval()
    inv_scale = torch.rand(hidden) + 0.5
    quantized = torch.nn.Sequential(torch.nn.Linear(hidden, 4 * hidden)).eval()
    quantize_int8(quantized, ["0"])
    with torch.inference_mode():
        return _speed_ratio(lambda: linear(x), lambda: quantized(x * inv_scale), reps)


def choose_precision(requested: str, device: torch.device, *, cpu_bf16: str | None = None,
                     cuda_capability: tuple[int, int] | None = None, cpu_bf16_speedup: float | None = None,
                     int8_gated: bool = False, cpu_int8_speedup: float | None = None) -> Precision:
    """The compute mode for `requested` on `device` (a pure function of its inputs: the CPU's bfloat16 flag,
    the measured bfloat16 and int8 speed-ups and the GPU's compute capability are passed in, or read from the
    machine when None). `int8_gated`: the backbone's int8 accuracy is recorded within the gate."""
    if requested not in MODES:
        raise ValueError(f"unknown precision {requested!r}; one of {', '.join(MODES)}")
    cpu = device.type == "cpu"
    if requested == "auto":
        if cpu:
            flag = native_bf16_cpu() if cpu_bf16 is None else (cpu_bf16 or None)
            if flag:
                speedup = bf16_speedup() if cpu_bf16_speedup is None else cpu_bf16_speedup
                if speedup >= BF16_MIN_SPEEDUP:
                    return Precision("bfloat16", torch.bfloat16, f"auto: the CPU computes bfloat16 natively "
                                     f"({flag}); measured {speedup:.2f}x float32's speed")
                why = f"the CPU has {flag}, but bfloat16 measured {speedup:.2f}x float32's speed (< {BF16_MIN_SPEEDUP})"
            else:
                why = "the CPU has no bfloat16 instructions (no avx512_bf16/amx_bf16)"
            if not int8_gated:
                return Precision("float32", torch.float32, f"auto: {why}; int8 is not gated for this backbone")
            gain = int8_speedup() if cpu_int8_speedup is None else cpu_int8_speedup
            if gain >= INT8_MIN_SPEEDUP:
                return Precision("int8", torch.float32, f"auto: {why}; int8 (within the accuracy gate for this "
                                 f"backbone) measured {gain:.2f}x float32's speed")
            return Precision("float32", torch.float32, f"auto: {why}; int8 measured {gain:.2f}x float32's speed "
                             f"(< {INT8_MIN_SPEEDUP})")
        cap = torch.cuda.get_device_capability(device) if cuda_capability is None else cuda_capability
        if cap >= (8, 0):
            return Precision("bfloat16", torch.bfloat16, f"auto: GPU compute capability {cap[0]}.{cap[1]} >= 8.0")
        return Precision("float16", torch.float16, f"auto: GPU compute capability {cap[0]}.{cap[1]} < 8.0")
    if requested == "float16" and cpu:
        raise ValueError("float16 is not supported on CPU; use bfloat16, int8 or float32")
    if requested == "int8" and not cpu:
        raise ValueError("int8 (dynamic quantisation) runs on CPU only; use float16 or bfloat16 on CUDA")
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int8": torch.float32}
    return Precision(requested, dtype[requested], "set by ADAPTER_SERVICE_DTYPE")
