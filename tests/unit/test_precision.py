"""The precision policy as a table: what `auto` picks per device, and what explicit modes are refused."""

from __future__ import annotations

import pytest
import torch

from service.modeling.precision import choose_precision, native_bf16_cpu

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize(
    "requested, device, cpu_bf16, capability, mode, dtype",
    [
        ("auto", CPU, "amx_bf16", None, "bfloat16", torch.bfloat16),
        ("auto", CPU, "avx512_bf16", None, "bfloat16", torch.bfloat16),
        ("auto", CPU, "", None, "float32", torch.float32),  # no native bfloat16: float32, never int8 unmeasured
        ("auto", CUDA, None, (9, 0), "bfloat16", torch.bfloat16),
        ("auto", CUDA, None, (8, 0), "bfloat16", torch.bfloat16),
        ("auto", CUDA, None, (7, 5), "float16", torch.float16),
        ("float32", CPU, "amx_bf16", None, "float32", torch.float32),
        ("bfloat16", CPU, "", None, "bfloat16", torch.bfloat16),
        ("int8", CPU, "", None, "int8", torch.float32),  # int8 weights, float32 activations elsewhere
        ("float16", CUDA, None, (9, 0), "float16", torch.float16),
    ],
)
def test_precision_table(requested, device, cpu_bf16, capability, mode, dtype):
    p = choose_precision(requested, device, cpu_bf16=cpu_bf16, cuda_capability=capability)
    assert (p.mode, p.dtype) == (mode, dtype)
    assert p.reason  # said in the log and /readyz


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
