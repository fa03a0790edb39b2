"""Prepacked bfloat16 linears (service.modeling.onednn): the same numbers as `nn.Linear` bit for bit, installed
on every encoder projection of a bfloat16 CPU backbone, and a fallback where oneDNN cannot pack."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from service.modeling import onednn
from service.modeling.backbone import PACKED_ROLES, get_layers, get_submodule, load_backbone
from service.modeling.onednn import PrepackedLinear, prepack

# oneDNN packs bfloat16 weights only on CPUs with AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT; elsewhere `prepack`
# keeps nn.Linear (the last test checks that fallback on every CPU)
packs_here = isinstance(prepack(nn.Linear(8, 4).to(torch.bfloat16)), PrepackedLinear)
needs_packing = pytest.mark.skipif(not packs_here, reason="oneDNN cannot pack bfloat16 weights on this CPU")


@needs_packing
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 48), (37, 48), (3, 11, 48), (700, 48), (704, 384), (5, 64, 1536)])
def test_a_prepacked_linear_gives_nn_linear_s_numbers_exactly(shape, bias):
    torch.manual_seed(0)
    d_in = shape[-1]
    d_out = {48: 80, 384: 1536, 1536: 384}[d_in]  # MiniLM's feed-forward widths among them
    linear = nn.Linear(d_in, d_out, bias=bias).to(torch.bfloat16).requires_grad_(False)
    packed = PrepackedLinear(linear)
    x = torch.randn(*shape, dtype=torch.bfloat16)
    with torch.inference_mode():
        got, want = packed(x), linear(x)
    assert got.shape == want.shape and got.dtype is torch.bfloat16
    assert torch.equal(got, want)
    assert (packed.in_features, packed.out_features) == (d_in, d_out)
    assert "_packed" not in packed.state_dict()  # never saved: built from the float weights at load time


@needs_packing
def test_a_bfloat16_cpu_backbone_runs_every_projection_prepacked_with_the_same_outputs(tiny_model_dirs):
    path = str(tiny_model_dirs["bert"])
    packed = load_backbone(path, device="cpu", dtype="bfloat16")
    layers = get_layers(packed.model, packed.spec)
    kinds = {type(get_submodule(layer, packed.spec.lora_target(role))) for layer in layers for role in PACKED_ROLES}
    assert kinds == {PrepackedLinear}
    plain = load_backbone(path, device="cpu", dtype="float32")
    assert not any(isinstance(m, PrepackedLinear) for m in plain.model.modules())  # float32: nn.Linear
    plain.model.to(torch.bfloat16)  # the same weights in bfloat16, plain nn.Linear layers
    enc = packed.tokenizer(["a short one", "and a somewhat longer second sentence"], padding=True,
                           return_tensors="pt")
    with torch.inference_mode():
        got = packed.model(**enc).last_hidden_state
        want = plain.model(**enc).last_hidden_state
    assert torch.equal(got, want)


def test_prepack_keeps_the_layer_where_onednn_cannot_pack(monkeypatch):
    linear = nn.Linear(8, 4).to(torch.bfloat16)
    assert isinstance(prepack(linear), PrepackedLinear) == packs_here
    state = torch.random.get_rng_state()
    prepack(linear)
    assert torch.equal(torch.random.get_rng_state(), state)  # its self-check leaves the global generator alone
    monkeypatch.setattr(onednn, "available", lambda: False)
    assert prepack(linear) is linear

    def refuse(*_args):
        raise RuntimeError("no oneDNN kernel for this layout")
    monkeypatch.setattr(onednn, "available", lambda: True)
    monkeypatch.setattr(onednn, "PrepackedLinear", lambda *_a: refuse())
    assert prepack(linear) is linear
