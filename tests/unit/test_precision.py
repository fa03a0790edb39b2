"""The precision policy as a table: what `auto` picks per device, and what explicit modes are refused."""

from __future__ import annotations

import pytest
import torch

from service.modeling.backbone import INT8_GATED_BACKBONES
from service.modeling.precision import (
    attention_f32_speedup,
    bf16_speedup,
    choose_precision,
    int8_speedup,
    native_bf16_cpu,
)
from service.settings import DEFAULT_BACKBONE

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize(
    "requested, device, cpu_bf16, speedup, capability, mode, dtype",
    [
        # where bfloat16 is not fast: int8, for a backbone whose int8 accuracy is gated, when it is fast
        ("auto", CPU, "avx512_bf16", 0.53, None, "int8-gated", torch.float32),
        ("auto", CPU, "", None, None, "int8-gated", torch.float32),
        ("auto", CPU, "amx_bf16", 2.7, None, "bfloat16", torch.bfloat16),
        ("auto", CPU, "avx512_bf16", 1.5, None, "bfloat16", torch.bfloat16),
        # the flag without the speed (measured: a VM with avx512_bf16 and no AMX ran bfloat16 at 0.53x)
        ("auto", CPU, "avx512_bf16", 0.53, None, "float32", torch.float32),
        ("auto", CPU, "amx_bf16", 1.1, None, "float32", torch.float32),  # below BF16_MIN_SPEEDUP
        ("auto", CPU, "", 3.0, None, "float32", torch.float32),  # no bfloat16 instructions: float32, never int8
        ("auto", CUDA, None, None, (9, 0), "bfloat16", torch.bfloat16),
        ("auto", CUDA, None, None, (8, 0), "bfloat16", torch.bfloat16),
        ("auto", CUDA, None, None, (7, 5), "float16", torch.float16),
        ("float32", CPU, "amx_bf16", 2.7, None, "float32", torch.float32),
        ("bfloat16", CPU, "", 0.5, None, "bfloat16", torch.bfloat16),  # asked for: given, slow or not
        ("int8", CPU, "", None, None, "int8", torch.float32),  # int8 weights, float32 activations elsewhere
        ("float16", CUDA, None, None, (9, 0), "float16", torch.float16),
    ],
)
def test_precision_table(requested, device, cpu_bf16, speedup, capability, mode, dtype):
    gated = mode == "int8-gated"
    p = choose_precision(requested, device, cpu_bf16=cpu_bf16, cuda_capability=capability, cpu_bf16_speedup=speedup,
                         int8_gated=gated, cpu_int8_speedup=2.1 if gated else 9.9, cpu_attention_speedup=1.0)
    assert (p.mode, p.dtype) == ("int8" if gated else mode, dtype)
    assert p.reason  # said in the log and /readyz
    if requested == "auto" and cpu_bf16:
        assert f"{speedup:.2f}x" in p.reason  # the measured figure is part of the reason


@pytest.mark.parametrize("requested, bf16_gain, attention_gain, attention", [
    ("auto", 2.5, 1.6, torch.float32),  # float32 attention measured faster: taken
    ("auto", 2.5, 1.05, None),  # below ATTENTION_F32_MIN_SPEEDUP: bfloat16 attention
    ("bfloat16", None, 1.6, torch.float32),  # asked for bfloat16: the attention choice still measured
    ("bfloat16", None, 0.7, None),
])
def test_the_bfloat16_mode_computes_attention_in_float32_where_that_is_measured_faster(requested, bf16_gain,
                                                                                       attention_gain, attention):
    p = choose_precision(requested, CPU, cpu_bf16="avx512_bf16", cpu_bf16_speedup=bf16_gain,
                         cpu_attention_speedup=attention_gain)
    assert (p.mode, p.attention_dtype) == ("bfloat16", attention)
    assert f"attention in {'float32' if attention else 'bfloat16'}" in p.reason and f"{attention_gain:.2f}x" in p.reason
    # the other modes never change their attention's dtype
    assert choose_precision("float32", CPU, cpu_attention_speedup=attention_gain).attention_dtype is None
    assert choose_precision("int8", CPU, cpu_bf16="", cpu_attention_speedup=attention_gain).attention_dtype is None


def test_the_probes_measure_positive_speed_ratios():
    assert 0.0 < attention_f32_speedup(rows=4, tokens=(4, 8), heads=2, head_dim=8, reps=3) < 100.0
    assert 0.0 < bf16_speedup(hidden=48, reps=3, attention_dtype=torch.float32) < 100.0
    assert 0.0 < bf16_speedup(hidden=48, reps=3) < 100.0
    assert 0.0 < int8_speedup(hidden=48, reps=3) < 100.0
    assert 0.0 < int8_speedup(hidden=48, reps=3, ffn_out_dtype=torch.bfloat16) < 100.0


@pytest.mark.parametrize("gated, gain, mode", [
    (True, 1.9, "int8"), (True, 1.15, "int8"), (True, 1.05, "float32"), (False, 3.0, "float32")])
def test_auto_takes_int8_only_gated_and_fast(gated, gain, mode):
    """Without fast bfloat16: int8 needs both the recorded accuracy gate and the measured speed."""
    p = choose_precision("auto", CPU, cpu_bf16="", cpu_bf16_speedup=None, int8_gated=gated, cpu_int8_speedup=gain)
    assert p.mode == mode
    assert ("gated" in p.reason) or f"{gain:.2f}x" in p.reason


@pytest.mark.parametrize("requested, device, message", [
    ("float16", CPU, "not supported on CPU"),
    ("int8", CUDA, "CPU only"),
    ("float64", CPU, "unknown precision"),
])
def test_impossible_precisions_are_refused(requested, device, message):
    with pytest.raises(ValueError, match=message):
        choose_precision(requested, device, cpu_bf16="", cuda_capability=(9, 0))


def test_the_bfloat16_flag_is_read_from_the_cpu_flags():
    assert native_bf16_cpu(frozenset({"avx2", "amx_bf16", "avx512_bf16"})) == "amx_bf16"
    assert native_bf16_cpu(frozenset({"avx512f", "avx512_bf16"})) == "avx512_bf16"
    assert native_bf16_cpu(frozenset({"avx2", "avx512_vnni"})) is None


@pytest.mark.parametrize("bf16_flag, bf16_gain, int8_gain, mode, ffn_out", [
    ("avx512_bf16", 2.2, 2.5, "int8", torch.bfloat16),  # both qualify: the faster; bfloat16 is fast for ffn_out
    ("amx_bf16", 6.0, 2.5, "bfloat16", None),  # bfloat16 the faster
    ("avx512_bf16", 0.53, 2.5, "int8", torch.float32),  # bfloat16 slow: int8, its ffn_out in float32
    ("", None, 2.5, "int8", torch.float32),  # no bfloat16 at all
    ("avx512_bf16", 1.1, 1.05, "float32", None),  # neither clears its bar
])
def test_auto_takes_the_fastest_mode_that_qualifies(bf16_flag, bf16_gain, int8_gain, mode, ffn_out):
    p = choose_precision("auto", CPU, cpu_bf16=bf16_flag, cpu_bf16_speedup=bf16_gain, int8_gated=True,
                         cpu_int8_speedup=int8_gain, cpu_attention_speedup=1.0)
    assert p.mode == mode
    if ffn_out is not None:
        assert p.int8_ffn_out_dtype is ffn_out


@pytest.mark.parametrize("bf16_flag, bf16_gain, ffn_out", [
    ("avx512_bf16", 2.2, torch.bfloat16), ("avx512_bf16", 0.53, torch.float32), ("", None, torch.float32)])
def test_int8_asked_for_holds_its_feed_forward_output_in_bfloat16_only_where_that_is_fast(bf16_flag, bf16_gain,
                                                                                           ffn_out):
    p = choose_precision("int8", CPU, cpu_bf16=bf16_flag, cpu_bf16_speedup=bf16_gain, cpu_attention_speedup=1.0)
    assert (p.mode, p.dtype, p.int8_ffn_out_dtype) == ("int8", torch.float32, ffn_out)


MINILM = next(iter(INT8_GATED_BACKBONES))


@pytest.mark.parametrize("name, flags, gated", [
    # 8-bit activations (AVX512-VNNI): recorded within the gate with either feed-forward output dtype
    (MINILM, {"avx2", "avx512f", "avx512_vnni"}, True),
    (MINILM, {"avx512_vnni", "avx512_bf16", "amx_bf16"}, True),
    # 7-bit activations (no AVX512-VNNI): recorded with the feed-forward output in float32, which a CPU
    # without bfloat16 instructions runs (docs/accuracy.md, session 12: a Zen 3)
    (MINILM, {"avx2", "fma"}, True),
    (MINILM, {"avx2", "avx_vnni"}, True),
    # 7-bit with a bfloat16 feed-forward output: never recorded
    (MINILM, {"avx2", "avx512_bf16"}, False),
    # a backbone whose int8 accuracy is not recorded: never, whatever the CPU
    ("0" * 64, {"avx512_vnni"}, False),
    (DEFAULT_BACKBONE, {"avx512_vnni"}, False),  # a name is not a fingerprint: the weights are what was scored
])
def test_int8_is_gated_where_its_recipe_is_recorded(monkeypatch, name, flags, gated):
    from service.modeling import backbone

    monkeypatch.setattr(backbone, "cpu_flags", lambda: frozenset(flags))
    assert backbone.int8_gated(name) is gated


def test_the_gated_fingerprint_is_the_backbone_the_shipped_tasks_were_trained_on():
    """The gate was scored on the shipped tasks, whose bundles name the backbone they were trained on."""
    from service.bundles.store import LocalAdapterStore
    from tests.conftest import REPO

    store = LocalAdapterStore(REPO / "adapters_store")
    tasks = store.list_tasks()
    assert len(tasks) == 6
    for task in tasks:
        info = store.get_info(task, store.get_active(task))
        assert info.manifest.backbone.fingerprint in INT8_GATED_BACKBONES, task


@pytest.mark.parametrize("mode", ["float32", "bfloat16", "int8"])
def test_the_probe_layer_runs_a_mixed_batch_s_adapters_as_the_engine_would(mode):
    """The probes time the traffic the service serves: every token through its task's adapter at both insertion
    points, by the strategy an engine picks for the mode (`default_strategy`)."""
    from service.modeling.precision import _ProbeLayer
    from service.modeling.slot_pool import default_strategy

    layer = _ProbeLayer(48, mode, rows=8, tokens=4, heads=4, tasks=4)
    assert len(layer.routing.specs) == 4 and len(layer.routing.segments) == 4
    one_thread = torch.get_num_threads() == 1
    assert layer.routing.strategy == ("segment" if mode != "bfloat16" and one_thread else "gather")
    assert layer.routing.strategy == default_strategy(CPU, dtype=layer.dtype)  # what an engine would pick
    assert layer.pool.dtype is layer.dtype
    with_adapters = layer()
    for t in (layer.pool.up_w, layer.pool.up_b):  # zero adapters: the plain layer
        t.zero_()
    assert with_adapters.shape == (32, 48) and not torch.equal(with_adapters, layer())
    with pytest.raises(ValueError, match="evenly"):
        _ProbeLayer(48, mode, rows=8, tokens=4, heads=4, tasks=3)
