"""The int8 kernel: per-token activation scales, full 8-bit range where VNNI allows it, bfloat16 cast layer."""

from __future__ import annotations

import threading

import pytest
import torch

from service.modeling.int8 import (
    CastLinear,
    FbgemmKernel,
    Int8Linear,
    OneDnnKernel,
    StackedInt8,
    StackedInt8Linear,
    build_kernel,
    full_range_activations,
)
from service.modeling.precision import cpu_flags

ONEDNN_HERE = full_range_activations(cpu_flags()) and OneDnnKernel.available()


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm()).item()


def _layer_and_input(seed: int = 0) -> tuple[torch.nn.Linear, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(96, 64)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(64, 96, generator=g) / 10)
        linear.bias.copy_(torch.randn(64, generator=g))
    x = torch.randn(40, 96, generator=g)
    x[0] *= 1000.0  # one token far larger than the rest, as [CLS] / [SEP] can be
    return linear, x


@pytest.mark.parametrize("flags, full", [
    ({"avx2", "avx512f", "avx512_vnni"}, True), ({"amx_int8", "avx512f", "avx512_vnni"}, True),
    ({"avx2", "avx_vnni"}, False),  # fbgemm has no AVX-VNNI kernels: its AVX2 path would saturate
    ({"avx2", "fma"}, False), ({"avx512f", "avx512bw"}, False), (set(), False),
])
def test_full_range_activations_need_avx512_vnni(flags, full):
    assert full_range_activations(frozenset(flags)) is full


def test_per_token_scales_keep_small_tokens_precise_beside_a_huge_one():
    linear, x = _layer_and_input()
    q = Int8Linear(linear.weight, linear.bias, None, full_range=False)
    with torch.inference_mode():
        want, got = linear(x), q(x)
    # every token, the small ones too, within the error of its own 7-bit grid
    for i in range(x.shape[0]):
        assert _relative_error(got[i], want[i]) < 0.03, i
    # one scale for the whole batch (what per-token scaling replaces) loses the small tokens entirely
    per_batch = torch.ops.quantized.linear_dynamic(x, q.kernel.packed, reduce_range=True) + linear.bias
    assert _relative_error(per_batch[1:], want[1:]) > 10 * _relative_error(got[1:], want[1:])


def test_a_row_gets_the_same_result_alone_and_in_a_batch():
    linear, x = _layer_and_input(1)
    q = Int8Linear(linear.weight, linear.bias, torch.rand(96) + 0.5, full_range=False)
    with torch.inference_mode():
        batch = q(x)
        for i in (0, 1, 17):
            # within the row's own rounding error (the kernel's one zero point can shift with the batch)
            assert _relative_error(q(x[i : i + 1]), batch[i : i + 1]) < 0.03, i


def test_smoothing_inside_the_layer_is_undone_and_lowers_the_error_of_an_outlier_channel():
    """A weight built as W diag(s) with inv_scale 1 / s computes x W^T; with s from the calibrated maxima
    (an input channel 40x the others, as LayerNorm outputs have) int8 gets closer to float32 than unsmoothed."""
    from service.modeling.smoothing import smoothing_factors

    linear, x = _layer_and_input(2)
    x = x[1:].clone()
    x[:, 5] *= 40.0
    s = smoothing_factors(x.abs().amax(0), linear.weight, 0.5)
    plain = Int8Linear(linear.weight, linear.bias, None, full_range=False)
    smoothed = Int8Linear(linear.weight * s, linear.bias, 1.0 / s, full_range=False)
    with torch.inference_mode():
        want = linear(x)
        assert _relative_error(smoothed(x), want) < 0.7 * _relative_error(plain(x), want)
    assert (smoothed.in_features, smoothed.out_features) == (96, 64)


@pytest.mark.skipif(not full_range_activations(cpu_flags()),
                    reason="8-bit activations are only exact on CPUs with AVX512-VNNI (this one has none)")
def test_full_range_activations_halve_the_error_on_a_vnni_cpu():
    linear, x = _layer_and_input(3)
    with torch.inference_mode():
        want = linear(x)
        errors = [_relative_error(Int8Linear(linear.weight, linear.bias, None, full_range=full)(x), want)
                  for full in (False, True)]
    assert errors[1] < 0.7 * errors[0], errors


def test_cast_linear_computes_in_bfloat16_and_answers_in_the_input_dtype():
    linear, x = _layer_and_input(4)
    cast = CastLinear(linear, torch.bfloat16)
    with torch.inference_mode():
        got, want = cast(x[1:]), linear(x[1:])
    assert got.dtype is torch.float32 and cast.dtype is torch.bfloat16
    assert cast.inner(x[1:].to(torch.bfloat16)).dtype is torch.bfloat16  # prepacked where oneDNN can
    assert (cast.in_features, cast.out_features) == (96, 64)
    assert 0 < _relative_error(got, want) < 0.02


def test_the_kernel_is_onednns_only_with_full_range_activations_and_where_the_recipe_asks_for_it():
    linear, _ = _layer_and_input(5)
    assert isinstance(build_kernel(linear.weight.detach(), full_range=False), FbgemmKernel)
    assert isinstance(build_kernel(linear.weight.detach(), full_range=True, onednn=False), FbgemmKernel)
    kernel = build_kernel(linear.weight.detach(), full_range=True)
    assert isinstance(kernel, OneDnnKernel if ONEDNN_HERE else FbgemmKernel)


@pytest.mark.skipif(not ONEDNN_HERE, reason="oneDNN's int8 kernel runs here only with AVX512-VNNI")
def test_onednn_kernel_agrees_with_fbgemm_within_8_bit_rounding():
    linear, x = _layer_and_input(6)
    w = linear.weight.detach()
    results = []
    for kernel in (OneDnnKernel(w), FbgemmKernel(w, full_range=True)):
        operand, c = kernel.quantize(x)
        results.append(kernel.matmul(operand) * c)
    want = x @ w.T
    for got in results:
        for i in range(x.shape[0]):  # per token: each row on its own 8-bit grid
            assert _relative_error(got[i], want[i]) < 0.015, i
    assert _relative_error(results[0], results[1]) < 0.015


def _stacked(seed: int = 7, full_range: bool = True):
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(n, 96, generator=g) / 10 for n in (64, 64, 32)]
    biases = [torch.randn(n, generator=g) for n in (64, 64, 32)]
    inv_scale = torch.rand(96, generator=g) + 0.5
    stack = StackedInt8(weights, biases, inv_scale, full_range=full_range)
    return weights, biases, inv_scale, stack, [StackedInt8Linear(stack, i) for i in range(len(weights))]


@pytest.mark.parametrize("full_range", [False, True])
def test_stacked_projections_equal_each_projection_quantised_alone(full_range):
    weights, biases, inv_scale, _, stacked = _stacked(full_range=full_range)
    x = torch.randn(2, 20, 96, generator=torch.Generator().manual_seed(8))
    with torch.inference_mode():
        for w, b, proj in zip(weights, biases, stacked):
            alone = Int8Linear(w, b, inv_scale, full_range=full_range)
            got = proj(x)
            assert got.shape == (2, 20, w.shape[0]) and (proj.in_features, proj.out_features) == (96, w.shape[0])
            # the same grids (per output channel, per token): the same result up to float summation order
            torch.testing.assert_close(got, alone(x), atol=1e-5, rtol=1e-5)


def test_each_stacked_projection_answers_its_own_columns_so_an_in_place_add_touches_no_other():
    _, _, _, _, (q, k, v) = _stacked()
    x = torch.randn(10, 96, generator=torch.Generator().manual_seed(11))
    with torch.inference_mode():
        yq = q(x)
        want_k = k(x).clone()
        yq.add_(1000.0)  # as LoRA adds its delta into the query's output
        yv = v(x)
        assert torch.equal(k(x), want_k)  # recomputed (all three had it): unchanged
        assert yv.abs().max() < 100 and yq.data_ptr() != yv.data_ptr()


def _count_matmuls(stack: StackedInt8, monkeypatch) -> list[int]:
    calls = [0]
    inner = stack.kernel.matmul

    def counted(operand):
        calls[0] += 1
        return inner(operand)

    monkeypatch.setattr(stack.kernel, "matmul", counted)
    return calls


def test_a_stack_multiplies_once_per_input_and_never_reuses_a_product_for_another_input(monkeypatch):
    _, _, _, stack, (q, k, v) = _stacked()
    calls = _count_matmuls(stack, monkeypatch)
    g = torch.Generator().manual_seed(9)
    x, y = torch.randn(10, 96, generator=g), torch.randn(10, 96, generator=g)
    with torch.inference_mode():
        first = [q(x), k(x), v(x)]
        assert calls[0] == 1  # one matmul for the three
        assert torch.equal(q(x), first[0]) and calls[0] == 2  # all three had it: a new forward recomputes
        assert not torch.equal(k(y), first[1]) and calls[0] == 3  # another input: its own product
        k(x)
        assert calls[0] == 4


def test_a_stacks_product_stays_on_the_thread_that_computed_it(monkeypatch):
    _, _, _, stack, (q, k, _) = _stacked()
    calls = _count_matmuls(stack, monkeypatch)
    x = torch.randn(10, 96, generator=torch.Generator().manual_seed(10))
    with torch.inference_mode():
        want = k(x).clone()
        q(x)  # this thread now holds x's product for key and value
        out: list[torch.Tensor] = []
        worker = threading.Thread(target=lambda: out.append(k(x)))
        worker.start()
        worker.join()
    assert calls[0] == 2  # the other thread computed its own (this one still holds it, for value)
    assert torch.equal(out[0], want)
