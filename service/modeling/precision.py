"""Compute precision: which number format the frozen backbone computes in, chosen once per device.

Modes (`ADAPTER_SERVICE_DTYPE`):
- `float32`, `float16` (CUDA only), `bfloat16`: the backbone's weights and activations in that format.
- `int8`: the backbone's frozen linear layers hold int8 weights (one scale per output channel) and
  quantise their input activations per batch (PyTorch's dynamic quantisation,
  `torch.ao.quantization.quantize_dynamic`, fbgemm/x86 kernels with VNNI dot products); everything else
  (embeddings, attention, LayerNorm, adapters, heads) float32. CPU only.
- `auto`: the fastest mode whose accuracy stays within the gate of docs/accuracy.md (0.5 points of
  float32 on every shipped task): CUDA: bfloat16 where the GPU computes it natively (compute capability
  >= 8.0), else float16. CPU: bfloat16 where the CPU has bfloat16 instructions (AMX-BF16 or AVX512-BF16)
  *and* a short measured probe at start-up finds a bfloat16 matmul of the backbone's kind at least
  `BF16_MIN_SPEEDUP` times as fast as float32, else float32. The flags alone do not decide: on a VM whose
  CPU reports `avx512_bf16` without AMX, PyTorch's bfloat16 matmuls ran at half the float32 speed
  (docs/benchmarks.md, session 5). `int8` is never picked by `auto`: it misses the gate on the shipped
  tasks (docs/accuracy.md).

Adapter and head weights stay float32 in bundles; the cache casts them to the compute dtype when it loads
them (float32 under `int8`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

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


def bf16_speedup(tokens: int = 256, hidden: int = 384, reps: int = 6) -> float:
    """float32 time / bfloat16 time of one linear layer `[tokens, hidden] -> [tokens, 4 hidden]` (a
    transformer's feed-forward inner projection) on this CPU, with the threads torch has now: the median of
    `reps` timed calls each, after two warm-up calls (about 30 ms on a 2-core VM)."""
    import time

    x = torch.randn(tokens, hidden)
    w = torch.randn(4 * hidden, hidden)
    times = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = x.to(dtype), w.to(dtype)
        for _ in range(2):
            torch.nn.functional.linear(a, b)
        samples = []
        for _ in range(reps):
            t0 = time.perf_counter()
            torch.nn.functional.linear(a, b)
            samples.append(time.perf_counter() - t0)
        times[dtype] = sorted(samples)[reps // 2]
    return times[torch.float32] / max(times[torch.bfloat16], 1e-9)


def choose_precision(requested: str, device: torch.device, *, cpu_bf16: str | None = None,
                     cuda_capability: tuple[int, int] | None = None, cpu_bf16_speedup: float | None = None,
                     ) -> Precision:
    """The compute mode for `requested` on `device` (a pure function of its inputs: the CPU's bfloat16 flag,
    the measured bfloat16 speed-up and the GPU's compute capability are passed in, or read from the machine
    when None)."""
    if requested not in MODES:
        raise ValueError(f"unknown precision {requested!r}; one of {', '.join(MODES)}")
    cpu = device.type == "cpu"
    if requested == "auto":
        if cpu:
            flag = native_bf16_cpu() if cpu_bf16 is None else (cpu_bf16 or None)
            if not flag:
                return Precision("float32", torch.float32, "auto: the CPU has no bfloat16 instructions "
                                 "(no avx512_bf16/amx_bf16)")
            speedup = bf16_speedup() if cpu_bf16_speedup is None else cpu_bf16_speedup
            if speedup >= BF16_MIN_SPEEDUP:
                return Precision("bfloat16", torch.bfloat16, f"auto: the CPU computes bfloat16 natively ({flag}); "
                                 f"measured {speedup:.2f}x float32's speed")
            return Precision("float32", torch.float32, f"auto: the CPU has {flag}, but bfloat16 measured "
                             f"{speedup:.2f}x float32's speed (< {BF16_MIN_SPEEDUP})")
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


def quantize_linear_layers(model: nn.Module) -> int:
    """Replace every nn.Linear of the frozen `model` by its dynamically quantised int8 version, in place.
    Returns how many were replaced.

    `torch.ao.quantization` is deprecated in favour of torchao, but torchao 0.18's int8 dynamic
    quantisation has no fast eager CPU kernel (measured against this path in docs/benchmarks.md), so this
    stays on the maintained-until-removed fbgemm/x86 path; its deprecation warning is silenced here only."""
    import warnings

    import torch.ao.quantization as tq

    count = sum(1 for m in model.modules() if type(m) is nn.Linear)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*deprecated")
        # torch leaves quantize_dynamic unannotated, and strict mode refuses calls to untyped functions
        tq.quantize_dynamic(  # type: ignore[no-untyped-call]
            model, {nn.Linear: tq.per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)
    return count
