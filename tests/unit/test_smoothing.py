"""The int8 recipe's smoothing is exact before quantisation, and its calibration reads every projection."""

from __future__ import annotations

import torch
import torch.ao.quantization as tq

from service.modeling.backbone import load_backbone
from service.modeling.smoothing import ALPHAS, SmoothedLinear, calibration_texts, quantize_smoothed


def test_smoothing_alone_changes_no_output_and_moves_the_outliers_into_the_weights(tiny_model_dirs, monkeypatch):
    path = str(tiny_model_dirs["bert"])
    ref = load_backbone(path, device="cpu", dtype="float32")
    smoothed = load_backbone(path, device="cpu", dtype="float32")
    monkeypatch.setattr(tq, "quantize_dynamic", lambda model, *a, **k: model)  # smoothing only
    count = quantize_smoothed(smoothed.model, smoothed.tokenizer, smoothed.spec)
    assert count == len(ALPHAS) * len(smoothed.model.encoder.layer)
    layer = smoothed.model.encoder.layer[0]
    assert isinstance(layer.intermediate.dense, SmoothedLinear)
    assert not torch.allclose(layer.intermediate.dense.inv_scale, torch.ones(1))  # really rescaled
    enc = ref.tokenizer(["John Smith flew from Paris to Berlin.", "great film"], padding=True, return_tensors="pt")
    with torch.inference_mode():
        want = ref.model(**enc).last_hidden_state
        got = smoothed.model(**enc).last_hidden_state
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_the_calibration_texts_ship_with_the_package():
    texts = calibration_texts()
    assert len(texts) == 256 and all(t.strip() for t in texts)
