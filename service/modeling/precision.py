"""Compute precision: which number format the frozen backbone computes in, chosen once per device.

Modes (`ADAPTER_SERVICE_DTYPE`):
- `float32`, `float16` (CUDA only), `bfloat16`: the backbone's weights and activations in that format.
- `int8`: every projection of the frozen backbone's layers (query, key, value, attention output, feed-forward
  inner and output) holds int8 weights (one scale per output channel) and quantises its smoothed input per
  token at each call (`service.modeling.int8`: PyTorch's fbgemm kernels, VNNI dot products; the recipe:
  `service.modeling.smoothing`); everything else (embeddings, attention, LayerNorm, adapters, heads)
  float32. CPU only.
- `auto`: the fastest mode whose accuracy stays within the gate of docs/accuracy.md (0.5 points of
  float32 on every shipped task): CUDA: bfloat16 where the GPU computes it natively (compute capability
  >= 8.0), else float16. CPU: of float32 and the candidates below, the one a short measured probe at
  start-up finds fastest (one linear layer of the backbone's kind, each candidate against float32):
  bfloat16 where the CPU has bfloat16 instructions (AMX-BF16 or AVX512-BF16) and the probe measures it at
  least `BF16_MIN_SPEEDUP` times as fast as float32 (the flags alone do not decide: on a VM whose CPU reports
  `avx512_bf16` without AMX, PyTorch's bfloat16 matmuls ran at half the float32 speed, docs/benchmarks.md,
  session 5); int8 where the backbone's int8 accuracy is recorded within the gate (`int8_gated`,
  `backbone.INT8_GATED_BACKBONES`) and its probe measures at least `INT8_MIN_SPEEDUP`.

Adapter and head weights stay float32 in bundles; the cache casts them to the compute dtype when it loads
them (float32 under `int8`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
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
    int8_ffn_out_dtype: torch.dtype = torch.float32
    """int8 mode: the dtype of its one projection that is not int8, the feed-forward output (bfloat16 where the
    CPU computes bfloat16 fast, see `service.modeling.smoothing`)."""

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


def int8_speedup(tokens: int = 256, hidden: int = 384, reps: int = 6) -> float:
    """float32 time / int8 time of the same linear layer as `bf16_speedup`, the int8 one as the `int8` mode
    runs it (`Int8Linear`, with its smoothing multiply and per-token scales): the median of `reps` timed calls
    each."""
    from service.modeling.int8 import Int8Linear, full_range_activations

    x = torch.randn(tokens, hidden)
    linear = torch.nn.Linear(hidden, 4 * hidden).eval()
    quantized = Int8Linear(linear.weight, linear.bias, torch.rand(hidden) + 0.5,
                           full_range=full_range_activations(cpu_flags()))
    with torch.inference_mode():
        return _speed_ratio(lambda: linear(x), lambda: quantized(x), reps)


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
            return _auto_cpu(cpu_bf16, cpu_bf16_speedup, int8_gated, cpu_int8_speedup)
        cap = torch.cuda.get_device_capability(device) if cuda_capability is None else cuda_capability
        if cap >= (8, 0):
            return Precision("bfloat16", torch.bfloat16, f"auto: GPU compute capability {cap[0]}.{cap[1]} >= 8.0")
        return Precision("float16", torch.float16, f"auto: GPU compute capability {cap[0]}.{cap[1]} < 8.0")
    if requested == "float16" and cpu:
        raise ValueError("float16 is not supported on CPU; use bfloat16, int8 or float32")
    if requested == "int8" and not cpu:
        raise ValueError("int8 (dynamic quantisation) runs on CPU only; use float16 or bfloat16 on CUDA")
    if requested == "int8":
        _, speedup = _bf16_probe(cpu_bf16, cpu_bf16_speedup)
        return _int8(speedup, "set by ADAPTER_SERVICE_DTYPE")
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int8": torch.float32}
    return Precision(requested, dtype[requested], "set by ADAPTER_SERVICE_DTYPE")


def _bf16_probe(cpu_bf16: str | None, cpu_bf16_speedup: float | None) -> tuple[str | None, float | None]:
    """The CPU's bfloat16 flag and, where it has one, bfloat16's measured speed-up (None without the flag)."""
    flag = native_bf16_cpu() if cpu_bf16 is None else (cpu_bf16 or None)
    if not flag:
        return None, None
    return flag, bf16_speedup() if cpu_bf16_speedup is None else cpu_bf16_speedup


def _int8(bf16_gain: float | None, reason: str) -> Precision:
    """The int8 mode, its feed-forward output in bfloat16 where bfloat16 measured fast, else float32."""
    if bf16_gain is not None and bf16_gain >= BF16_MIN_SPEEDUP:
        return Precision("int8", torch.float32, f"{reason}; feed-forward output in bfloat16", torch.bfloat16)
    return Precision("int8", torch.float32, f"{reason}; feed-forward output in float32")


def _auto_cpu(cpu_bf16: str | None, cpu_bf16_speedup: float | None, int8_gated: bool,
              cpu_int8_speedup: float | None) -> Precision:
    """`auto` on CPU: the fastest of float32 and the candidates that qualify (see the module docstring)."""
    flag, speedup = _bf16_probe(cpu_bf16, cpu_bf16_speedup)
    candidates: dict[str, float] = {}
    notes = []
    if flag and speedup is not None:
        notes.append(f"bfloat16 ({flag}) measured {speedup:.2f}x float32's speed")
        if speedup >= BF16_MIN_SPEEDUP:
            candidates["bfloat16"] = speedup
    else:
        notes.append("the CPU has no bfloat16 instructions (no avx512_bf16/amx_bf16)")
    if int8_gated:
        gain = int8_speedup() if cpu_int8_speedup is None else cpu_int8_speedup
        notes.append(f"int8 (within the accuracy gate for this backbone) measured {gain:.2f}x")
        if gain >= INT8_MIN_SPEEDUP:
            candidates["int8"] = gain
    else:
        notes.append("int8 is not gated for this backbone")
    why = "; ".join(notes)
    if not candidates:
        return Precision("float32", torch.float32, f"auto: {why}; nothing qualifies "
                         f"(bfloat16 needs >= {BF16_MIN_SPEEDUP}x, int8 >= {INT8_MIN_SPEEDUP}x)")
    best = max(candidates, key=lambda mode: candidates[mode])
    reason = f"auto: the fastest that qualifies: {why}"
    return _int8(speedup, reason) if best == "int8" else Precision("bfloat16", torch.bfloat16, reason)
