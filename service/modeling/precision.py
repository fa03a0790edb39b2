"""Compute precision: which number format the frozen backbone computes in, chosen once per device.

Modes (`ADAPTER_SERVICE_DTYPE`):
- `float32`, `float16` (CUDA only), `bfloat16`: the backbone's weights and activations in that format.
- `int8`: the frozen backbone's query, key, value, attention output and feed-forward inner projections hold
  int8 weights (one scale per output channel) and quantise their smoothed input per token at each call
  (`service.modeling.int8`: oneDNN's or fbgemm's int8 kernels, VNNI dot products; the recipe:
  `service.modeling.smoothing`, `int8.RECIPES`); the feed-forward output projection computes in `int8_ffn_out_dtype`
  (bfloat16 where the CPU computes it fast, else float32); everything else (embeddings, attention,
  LayerNorm, adapters, heads) float32. CPU only.
- `auto`: the fastest mode whose accuracy stays within the gate of docs/accuracy.md (0.5 points of
  float32 on every shipped task): CUDA: bfloat16 where the GPU computes it natively (compute capability
  >= 8.0), else float16. CPU: of float32 and the candidates below, the one a short measured probe at
  start-up finds fastest (one encoder layer with a mixed batch's adapters, `_ProbeLayer`, timed in each
  candidate against float32):
  bfloat16 where the CPU has bfloat16 instructions (AMX-BF16 or AVX512-BF16) and the probe measures it at
  least `BF16_MIN_SPEEDUP` times as fast as float32 (the flags alone do not decide: on a VM whose CPU reports
  `avx512_bf16` without AMX, PyTorch's bfloat16 matmuls ran at half the float32 speed, docs/benchmarks.md,
  session 5); int8 where the backbone's int8 accuracy is recorded within the gate for the recipe this CPU runs
  (`int8_gated`, `backbone.int8_gated`: 8-bit activations with AVX512-VNNI, 7-bit without) and its probe
  measures at least `INT8_MIN_SPEEDUP`.

In the bfloat16 mode on CPU, packed forwards compute attention in float32 where a second short probe measures
PyTorch's float32 attention kernel faster than its bfloat16 one (`attention_f32_speedup`,
`Precision.attention_dtype`); the bfloat16 probe then times the layer that way.

Adapter and head weights stay float32 in bundles; the cache casts them to the compute dtype when it loads
them (float32 under `int8`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from service.modeling.onednn import prepack

if TYPE_CHECKING:
    from service.modeling.slot_pool import Routing, SlotPool

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
    attention_dtype: torch.dtype | None = None
    """The dtype packed forwards compute attention in where it is not `dtype` (None: `dtype`): float32 for the
    bfloat16 mode on a CPU whose float32 attention kernel the probe measures faster than its bfloat16 one
    (`attention_f32_speedup`); query, key and value are cast up and the result back, so it is the more exact too."""

    @property
    def quantized(self) -> bool:
        return self.mode == "int8"

    def padded(self) -> Precision:
        """This mode as padded forwards run it: their attention is the model's own (Hugging Face's), in `dtype`,
        whatever `attention_dtype` says for packed ones."""
        if self.attention_dtype is None:
            return self
        name = str(self.dtype).removeprefix("torch.")
        return replace(self, attention_dtype=None, reason=f"{self.reason}; padded forwards: attention in {name}")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere), read once a process."""
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


ATTENTION_F32_MIN_SPEEDUP = 1.1
"""The bfloat16 mode computes attention in float32 on a CPU only where its probe measures that at least this much
faster (`attention_f32_speedup`)."""

BF16_MIN_SPEEDUP = 1.2
"""`auto` takes bfloat16 on a CPU only when the probe measures it at least this much faster than float32."""


def _speed_ratio(baseline: Callable[[], object], candidate: Callable[[], object], reps: int) -> float:
    """baseline time / candidate time: after two warm-up calls each, `reps` rounds that time one call of each,
    in alternating order; the median of the rounds' ratios (drift and a noisy neighbour hit both alike)."""
    import time

    for run in (baseline, candidate, baseline, candidate):
        run()
    ratios = []
    for i in range(reps):
        spent = {}
        for name, run in (("b", baseline), ("c", candidate))[:: 1 if i % 2 else -1]:
            t0 = time.perf_counter()
            run()
            spent[name] = time.perf_counter() - t0
        ratios.append(spent["b"] / max(spent["c"], 1e-9))
    return sorted(ratios)[reps // 2]


def attention_f32_speedup(reps: int = 11, rows: int = 32, tokens: tuple[int, ...] = (24, 33, 48), heads: int = 12,
                          head_dim: int = 32) -> float:
    """bfloat16 time / float32 time of the attention of packed bfloat16 batches (`packed.packed_attention`, as packed
    forwards run it: `rows` rows of 8..T tokens, `heads` heads of `head_dim`), one batch for each longest row T of
    `tokens` in every timed call, the float32 one including the casts of query, key and value up and of the
    result back (`_speed_ratio`; about 0.2 s on a 2-core VM). Above 1 where this CPU's float32 attention kernel
    is the faster: PyTorch's CPU flash attention ran up to 1.8x slower in bfloat16 than in float32 on a Zen 5, by
    how long the batch's longest row is (docs/benchmarks.md, session 13): several lengths, so that no one
    length's luck decides."""
    from service.modeling.packed import (  # packed imports backbone, which imports this
        Packing,
        packed_attention,
    )

    g = torch.Generator().manual_seed(0)
    batches = []
    for longest in tokens:
        lengths = torch.randint(min(8, longest), longest + 1, (rows,), generator=g)
        lengths[0] = longest
        packing = Packing.of(lengths.tolist(), torch.device("cpu"))
        q, k, v = (torch.randn(packing.tokens, heads * head_dim, generator=g).to(torch.bfloat16) for _ in range(3))
        batches.append((q, k, v, packing))

    def run(dtype: torch.dtype | None) -> Callable[[], object]:
        return lambda: [packed_attention(q, k, v, heads, packing, dtype) for q, k, v, packing in batches]

    with torch.inference_mode():
        return _speed_ratio(run(None), run(torch.float32), reps)


def _probe_adapters(hidden: int, dtype: torch.dtype, rows: int, tokens: int, tasks: int) -> tuple[SlotPool, Routing]:
    """A one-layer slot pool in `dtype` holding `tasks` random Houlsby adapters (the default shape), and the routing
    of a packed batch of `rows` rows of `tokens` tokens split evenly among them, by the strategy an engine
    picks for `dtype` on this CPU (`default_strategy`): the adapter work of a mixed batch, as the service runs it."""
    from service.bundles.layout import adapter_key
    from service.bundles.manifest import AdapterConfig
    from service.modeling.batch_plan import Segment
    from service.modeling.slot_pool import SlotPool, default_strategy

    g = torch.Generator().manual_seed(1)
    cpu, cfg = torch.device("cpu"), AdapterConfig()
    pool = SlotPool(1, hidden, tasks, device=cpu, dtype=dtype, base_norms=[(torch.ones(hidden), torch.zeros(hidden))] * 2)
    shapes = {"down.weight": (hidden, cfg.bottleneck), "down.bias": (cfg.bottleneck,),
              "up.weight": (cfg.bottleneck, hidden), "up.bias": (hidden,)}
    for slot in range(1, tasks + 1):
        pool.write(slot, cfg, {adapter_key(0, point, part): 0.02 * torch.randn(shape, generator=g)
                               for point in cfg.points for part, shape in shapes.items()})
    if rows % tasks:
        raise ValueError(f"{rows} rows do not split evenly among {tasks} tasks")
    per = rows // tasks
    segments = [Segment(slot, (slot - 1) * per, slot * per) for slot in range(1, tasks + 1)]
    routing = pool.routing_packed(segments, [row * tokens for row in range(rows + 1)],
                                  default_strategy(cpu, dtype=dtype), bucket_shapes=dtype is torch.bfloat16)
    return pool, routing


class _ProbeLayer:
    """The probes' workload: one BERT-style encoder layer (Q/K/V, attention, output projection, adapter, residual +
    LayerNorm, feed-forward, adapter, residual + LayerNorm) on `rows x tokens` packed tokens of `tasks` tasks, its
    projections in the compute mode being measured and its adapters as a mixed batch of that mode runs them
    (`_probe_adapters`): everything that differs between the modes for the traffic the service serves, not just
    one matmul (a single-matmul probe had int8 and bfloat16 within 10% of each other on a CPU where the whole
    model ran 17% faster in int8; a layer without adapters had int8 ahead of bfloat16 on a Zen 5 where bfloat16
    ran mixed batches 9% faster, docs/benchmarks.md session 13)."""

    def __init__(self, hidden: int, mode: str, ffn_out_dtype: torch.dtype = torch.float32,
                 rows: int = 16, tokens: int = 32, heads: int = 12, attention_dtype: torch.dtype | None = None,
                 tasks: int = 8):
        from service.modeling.int8 import RECIPES, CastLinear, full_range_activations, int8_projections
        from service.modeling.packed import Packing

        g = torch.Generator().manual_seed(0)
        recipe = RECIPES[ffn_out_dtype]
        self.dtype = torch.bfloat16 if mode == "bfloat16" else torch.float32
        self.heads, self.attention_dtype = heads, attention_dtype
        self.x = torch.randn(rows * tokens, hidden, generator=g).to(self.dtype)  # packed
        shapes = [(hidden, hidden)] * 4 + [(4 * hidden, hidden), (hidden, 4 * hidden)]
        linears = [torch.nn.Linear(n_in, n_out).eval().requires_grad_(False) for n_out, n_in in shapes]
        if mode == "int8":  # the five int8 projections grouped as the recipe smooths them, each group one input
            groups = [[0, 1, 2], [3], [4]] if recipe.stacked_qkv else [[0], [1], [2], [3], [4]]
            self.proj: list[torch.nn.Module] = []
            for group in groups:
                self.proj += int8_projections(
                    [linears[i].weight for i in group], [linears[i].bias for i in group],
                    torch.rand(hidden, generator=g) + 0.5, full_range=full_range_activations(cpu_flags()),
                    onednn=recipe.onednn)
            ffn_out = linears[5]
            self.proj.append(CastLinear(ffn_out, ffn_out_dtype) if ffn_out_dtype != torch.float32 else ffn_out)
        elif mode == "bfloat16":
            self.proj = [prepack(linear.to(self.dtype)) for linear in linears]  # as the bfloat16 backbone runs them
        else:
            self.proj = [linear.to(self.dtype) for linear in linears]
        self.norms = [torch.nn.LayerNorm(hidden, dtype=self.dtype).eval() for _ in range(2)]
        self.pool, self.routing = _probe_adapters(hidden, self.dtype, rows, tokens, tasks)
        self.packing = Packing.of([tokens] * rows, torch.device("cpu"))

    def __call__(self) -> torch.Tensor:
        from service.modeling.packed import packed_attention

        F = torch.nn.functional
        x, (q, k, v, o, inner, outer) = self.x, self.proj
        pool, r = self.pool, self.routing
        with torch.inference_mode(), pool.route(r):
            ctx = packed_attention(q(x), k(x), v(x), self.heads, self.packing, self.attention_dtype)
            h = self.norms[0](pool.apply_adapters(0, o(ctx), r) + x)
            out: torch.Tensor = self.norms[1](pool.apply_adapters(1, outer(F.gelu(inner(h))), r) + h)
            return out


def bf16_speedup(hidden: int = 384, reps: int = 7, attention_dtype: torch.dtype | None = None) -> float:
    """float32 time / bfloat16 time of one encoder layer (`_ProbeLayer`) on this CPU, with the threads torch
    has now (`_speed_ratio`; about 0.3 s on a 2-core VM), the bfloat16 one's attention in `attention_dtype`
    (None: bfloat16), as the bfloat16 mode will run it."""
    return _speed_ratio(_ProbeLayer(hidden, "float32"),
                        _ProbeLayer(hidden, "bfloat16", attention_dtype=attention_dtype), reps)


INT8_MIN_SPEEDUP = 1.1
"""`auto` takes int8 only when its probe measures it at least this much faster than float32. Lower than
`BF16_MIN_SPEEDUP`: the one-layer probe reads int8's gain lower and noisier than the whole packed backbone
shows it (docs/benchmarks.md, session 10), and a bar of 1.2 flipped `auto` between int8 and float32 from one
start to the next on a CPU where int8 ran the backbone faster in every run."""


def int8_speedup(hidden: int = 384, reps: int = 7, ffn_out_dtype: torch.dtype = torch.float32) -> float:
    """float32 time / int8 time of the same layer as `bf16_speedup`, the int8 one as the `int8` mode runs it:
    its five int8 projections built by the recipe for `ffn_out_dtype` (`int8.RECIPES`: smoothing multiply,
    per-token scales, query/key/value stacked or not), the feed-forward output in
    `ffn_out_dtype`, the rest float32 (`_speed_ratio`)."""
    return _speed_ratio(_ProbeLayer(hidden, "float32"), _ProbeLayer(hidden, "int8", ffn_out_dtype), reps)


def choose_precision(requested: str, device: torch.device, *, cpu_bf16: str | None = None,
                     cuda_capability: tuple[int, int] | None = None, cpu_bf16_speedup: float | None = None,
                     int8_gated: bool = False, cpu_int8_speedup: float | None = None,
                     cpu_attention_speedup: float | None = None) -> Precision:
    """The compute mode for `requested` on `device` (a pure function of its inputs: the CPU's bfloat16 flag,
    the measured bfloat16, int8 and float32-attention speed-ups and the GPU's compute capability are passed in,
    or read from the machine when None). `int8_gated`: the backbone's int8 accuracy is recorded within the gate."""
    if requested not in MODES:
        raise ValueError(f"unknown precision {requested!r}; one of {', '.join(MODES)}")
    cpu = device.type == "cpu"
    if requested == "auto":
        if cpu:
            return _auto_cpu(cpu_bf16, cpu_bf16_speedup, int8_gated, cpu_int8_speedup, cpu_attention_speedup)
        cap = torch.cuda.get_device_capability(device) if cuda_capability is None else cuda_capability
        if cap >= (8, 0):
            return Precision("bfloat16", torch.bfloat16, f"auto: GPU compute capability {cap[0]}.{cap[1]} >= 8.0")
        return Precision("float16", torch.float16, f"auto: GPU compute capability {cap[0]}.{cap[1]} < 8.0")
    if requested == "float16" and cpu:
        raise ValueError("float16 is not supported on CPU; use bfloat16, int8 or float32")
    if requested == "int8" and not cpu:
        raise ValueError("int8 (dynamic quantisation) runs on CPU only; use float16 or bfloat16 on CUDA")
    if requested == "int8":
        speedup = _bf16_probe(_bf16_flag(cpu_bf16), cpu_bf16_speedup, None)
        return _int8(speedup, "set by ADAPTER_SERVICE_DTYPE")
    if requested == "bfloat16" and cpu:
        return _bf16("set by ADAPTER_SERVICE_DTYPE", _attention_probe(cpu_attention_speedup))
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    return Precision(requested, dtype[requested], "set by ADAPTER_SERVICE_DTYPE")


def _attention_probe(cpu_attention_speedup: float | None) -> tuple[torch.dtype | None, float]:
    """The bfloat16 mode's attention dtype on this CPU (float32 where measured at least
    `ATTENTION_F32_MIN_SPEEDUP` faster, else None: bfloat16) and the measured ratio."""
    gain = attention_f32_speedup() if cpu_attention_speedup is None else cpu_attention_speedup
    return (torch.float32 if gain >= ATTENTION_F32_MIN_SPEEDUP else None), gain


def _bf16(reason: str, attention: tuple[torch.dtype | None, float]) -> Precision:
    """The bfloat16 mode on CPU, its attention as `_attention_probe` measured it."""
    dtype, gain = attention
    where = "float32" if dtype is not None else "bfloat16"
    return Precision("bfloat16", torch.bfloat16,
                     f"{reason}; attention in {where} (float32 measured {gain:.2f}x bfloat16's speed)",
                     attention_dtype=dtype)


def _bf16_flag(cpu_bf16: str | None) -> str | None:
    """The CPU's bfloat16 flag: `cpu_bf16` as passed in ("" for none), or read from the machine when None."""
    return native_bf16_cpu() if cpu_bf16 is None else (cpu_bf16 or None)


def _bf16_probe(flag: str | None, cpu_bf16_speedup: float | None,
                attention_dtype: torch.dtype | None) -> float | None:
    """bfloat16's measured speed-up where the CPU has the bfloat16 `flag` (None without it), its attention computed
    in `attention_dtype` (None: bfloat16)."""
    if not flag:
        return None
    return bf16_speedup(attention_dtype=attention_dtype) if cpu_bf16_speedup is None else cpu_bf16_speedup


def _ffn_out_dtype(bf16_gain: float | None) -> torch.dtype:
    """The int8 mode's feed-forward output dtype: bfloat16 where bfloat16 measured fast, else float32."""
    return torch.bfloat16 if bf16_gain is not None and bf16_gain >= BF16_MIN_SPEEDUP else torch.float32


def _int8(bf16_gain: float | None, reason: str) -> Precision:
    """The int8 mode, its feed-forward output in `_ffn_out_dtype`."""
    ffn_out = _ffn_out_dtype(bf16_gain)
    name = "bfloat16" if ffn_out == torch.bfloat16 else "float32"
    return Precision("int8", torch.float32, f"{reason}; feed-forward output in {name}", ffn_out)


def _auto_cpu(cpu_bf16: str | None, cpu_bf16_speedup: float | None, int8_gated: bool,
              cpu_int8_speedup: float | None, cpu_attention_speedup: float | None) -> Precision:
    """`auto` on CPU: the fastest of float32 and the candidates that qualify (see the module docstring)."""
    flag = _bf16_flag(cpu_bf16)
    attention = _attention_probe(cpu_attention_speedup) if flag else (None, 1.0)
    speedup = _bf16_probe(flag, cpu_bf16_speedup, attention[0])
    candidates: dict[str, float] = {}
    notes = []
    if flag and speedup is not None:
        notes.append(f"bfloat16 ({flag}) measured {speedup:.2f}x float32's speed")
        if speedup >= BF16_MIN_SPEEDUP:
            candidates["bfloat16"] = speedup
    else:
        notes.append("the CPU has no bfloat16 instructions (no avx512_bf16/amx_bf16)")
    if int8_gated:
        gain = int8_speedup(ffn_out_dtype=_ffn_out_dtype(speedup)) if cpu_int8_speedup is None else cpu_int8_speedup
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
    return _int8(speedup, reason) if best == "int8" else _bf16(reason, attention)
