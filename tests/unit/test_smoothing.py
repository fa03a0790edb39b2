"""The int8 recipe's smoothing is exact before quantisation, and its calibration reads every projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from service.modeling.backbone import load_backbone
from service.modeling.int8 import Int8Linear
from service.modeling.smoothing import ALPHAS, calibration_texts, quantize_smoothed, smoothing_factors


def test_smoothing_changes_no_output_and_moves_the_outliers_into_the_weights():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=g)
    x[:, 3] *= 50.0  # an outlier channel, as LayerNorm outputs have
    w, b = torch.randn(48, 32, generator=g), torch.randn(48, generator=g)
    s = smoothing_factors(x.abs().amax(0), w, 0.5)
    torch.testing.assert_close(F.linear(x / s, w * s, b), F.linear(x, w, b), atol=1e-4, rtol=1e-5)
    spread = lambda t: (t.abs().amax(0).max() / t.abs().amax(0).min()).item()  # noqa: E731
    assert spread(x / s) < spread(x) / 5  # the activation's channels are far more even
    assert spread(w * s) > spread(w)  # the weight's input columns took up the difference


def test_the_recipe_replaces_every_int8_role_of_every_layer_with_its_calibrated_smoothing(tiny_model_dirs):
    backbone = load_backbone(str(tiny_model_dirs["bert"]), device="cpu", dtype="float32")
    count = quantize_smoothed(backbone.model, backbone.tokenizer, backbone.spec)
    layers = backbone.model.encoder.layer
    assert count == len(ALPHAS) * len(layers)
    for layer in layers:
        proj = layer.intermediate.dense
        assert isinstance(proj, Int8Linear)
        assert not torch.allclose(proj.inv_scale, torch.ones(1))  # really rescaled, from the calibration


def test_the_calibration_texts_ship_with_the_package():
    texts = calibration_texts()
    assert len(texts) == 256 and all(t.strip() for t in texts)


def test_query_key_and_value_stack_only_together_and_a_lone_one_keeps_its_own_smoothing(tiny_model_dirs):
    """With a float32 feed-forward output the recipe stacks the layer's plain query, key and value; where only
    one of them is still a plain linear there is nothing to stack: it becomes an `Int8Linear` of its own."""
    from service.modeling.int8 import StackedInt8Linear

    backbone = load_backbone(str(tiny_model_dirs["bert"]), device="cpu", dtype="float32")
    layers = backbone.model.encoder.layer
    sa = layers[1].attention.self  # layer 1: key and value already taken by something else
    sa.key, sa.value = torch.nn.Sequential(sa.key), torch.nn.Sequential(sa.value)
    count = quantize_smoothed(backbone.model, backbone.tokenizer, backbone.spec, ffn_out_dtype=torch.float32)
    assert count == len(ALPHAS) * len(layers) - 2
    first, second = layers[0].attention.self, layers[1].attention.self
    assert all(isinstance(p, StackedInt8Linear) for p in (first.query, first.key, first.value))
    assert isinstance(second.query, Int8Linear) and type(second.key) is torch.nn.Sequential
