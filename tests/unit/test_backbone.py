"""Backbone loading: architectures, freezing, fingerprint, clear errors."""

from __future__ import annotations

import pytest
import torch

from service.errors import BackboneLoadError
from service.modeling.backbone import ARCHITECTURES, fingerprint, get_submodule, load_backbone
from service.modeling.lora import RoutedLinear
from service.modeling.slot_pool import RoutedLayerNorm, RoutedProjection, install_slot_pool


@pytest.mark.parametrize("kind", ["bert", "roberta", "distilbert"])
def test_loads_frozen_in_eval_mode_with_insertion_points(tiny_model_dirs, kind):
    b = load_backbone(str(tiny_model_dirs[kind]), device="cpu", dtype="float32")
    assert b.ref.model_type == kind and b.ref.hidden_size == 32 and b.ref.num_layers == 2
    assert not b.model.training
    assert not any(p.requires_grad for p in b.model.parameters())
    spec = ARCHITECTURES[kind]
    for layer in b.layers:
        for point in ("attn", "ffn"):
            proj = get_submodule(layer, spec.projection(point))
            norm = get_submodule(layer, spec.norm(point))
            assert isinstance(proj, torch.nn.Linear) and proj.out_features == 32
            assert isinstance(norm, torch.nn.LayerNorm)


def test_installing_the_pool_wraps_every_insertion_point_once(tiny_backbone):
    b = tiny_backbone
    install_slot_pool(b.model, b.spec, 4, device=b.device, dtype=b.dtype)
    install_slot_pool(b.model, b.spec, 4, device=b.device, dtype=b.dtype)  # idempotent: no double wrapping
    for layer in b.layers:
        for point in ("attn", "ffn"):  # the adapter after the projection, LoRA inside it
            proj = get_submodule(layer, b.spec.projection(point))
            assert isinstance(proj, RoutedProjection) and isinstance(proj.base, RoutedLinear)
            assert isinstance(proj.base.base, torch.nn.Linear)
        for target in ("query", "key", "value", "ffn_in"):
            routed = get_submodule(layer, b.spec.lora_target(target))
            assert isinstance(routed, RoutedLinear) and isinstance(routed.base, torch.nn.Linear)
        assert isinstance(get_submodule(layer, b.spec.norm("attn")), RoutedLayerNorm)


def test_fingerprint_is_stable_and_sensitive_to_weights(tiny_model_dirs):
    a = load_backbone(str(tiny_model_dirs["bert"]), device="cpu", dtype="float32")
    b = load_backbone(str(tiny_model_dirs["bert"]), device="cpu", dtype="float32")
    assert a.ref.fingerprint == b.ref.fingerprint
    assert a.ref.fingerprint != load_backbone(str(tiny_model_dirs["roberta"]), device="cpu").ref.fingerprint
    with torch.no_grad():
        next(b.model.parameters())[0, 0] += 1e-3
    assert fingerprint(b.model) != a.ref.fingerprint


def test_fingerprint_ignores_the_serving_dtype(tiny_model_dirs):
    f32 = load_backbone(str(tiny_model_dirs["bert"]), device="cpu", dtype="float32")
    bf16 = load_backbone(str(tiny_model_dirs["bert"]), device="cpu", dtype="bfloat16")
    assert bf16.dtype is torch.bfloat16 and f32.ref.fingerprint == bf16.ref.fingerprint


def test_missing_backbone_is_a_clear_error(tmp_path):
    with pytest.raises(BackboneLoadError, match="nothing is downloaded"):
        load_backbone("someone/not-in-the-local-cache", device="cpu")
    with pytest.raises(BackboneLoadError, match="folder"):
        load_backbone(str(tmp_path), device="cpu")


def test_unsupported_architecture_is_a_clear_error(tmp_path, minilm_dir):
    from transformers import AutoTokenizer, GPT2Config, GPT2Model

    GPT2Model(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=30522)).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(minilm_dir).save_pretrained(tmp_path)
    with pytest.raises(BackboneLoadError, match="unsupported backbone architecture 'gpt2'"):
        load_backbone(str(tmp_path), device="cpu")


def test_cuda_request_without_cuda_is_a_clear_error(tiny_model_dirs):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(BackboneLoadError, match="CUDA is not available"):
        load_backbone(str(tiny_model_dirs["bert"]), device="cuda")
