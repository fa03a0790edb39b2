"""The engine on the real packaged all-MiniLM-L6-v2 (offline)."""

from __future__ import annotations

import pytest
import torch

from service.bundles.codec import encode_bundle
from service.bundles.manifest import AdapterConfig, HeadType
from service.runtime.engine import Engine, RowRequest
from tests.conftest import make_manifest
from tests.synthetic import random_tensors

pytestmark = pytest.mark.integration

TEXTS = [
    "The new phone's battery lasts two full days.",
    "Stocks fell sharply after the central bank raised interest rates.",
    "what a dull, lifeless film",
    "Barcelona beat Real Madrid 3-1 in Sunday's match.",
]


def test_packaged_backbone_is_minilm(minilm_backbone):
    ref = minilm_backbone.ref
    assert (ref.model_type, ref.hidden_size, ref.num_layers) == ("bert", 384, 6)
    assert len(ref.fingerprint) == 64


def test_mixed_batch_equals_alone_on_minilm(minilm_backbone, store):
    tasks = [("a", HeadType.CLASSIFICATION, AdapterConfig(bottleneck=64)),
             ("b", HeadType.TOKEN_CLASSIFICATION, AdapterConfig(placement="pfeiffer", bottleneck=32)),
             ("c", HeadType.REGRESSION, AdapterConfig(bottleneck=64, train_layernorm=True))]
    for i, (task, head, cfg) in enumerate(tasks):
        m = make_manifest(minilm_backbone.ref, task=task, head_type=head, adapter=cfg)
        store.put(task, encode_bundle(m, random_tensors(m, seed=i, std=0.05)))
    engine = Engine(minilm_backbone, store)
    reqs = [RowRequest(t, 1, r) for j, (t, _, _) in enumerate(tasks)
            for r in engine.encode(store.get_info(t, 1).manifest, TEXTS[j:] + TEXTS[:j])]
    mixed = reqs[::2] + reqs[1::2]
    for req, res in zip(mixed, engine.run(mixed, keep_logits=True)):
        (ref,) = engine.run([req], keep_logits=True)
        torch.testing.assert_close(res.logits, ref.logits, atol=1e-5, rtol=0)


def test_zero_up_projection_is_exact_identity_on_minilm(minilm_backbone, store):
    m = make_manifest(minilm_backbone.ref, task="ident", adapter=AdapterConfig(bottleneck=64))
    t = random_tensors(m, seed=0, std=0.05)
    for k in t:
        if ".up." in k:
            t[k].zero_()
    store.put("ident", encode_bundle(m, t))
    m0 = m.model_copy(update={"task": "plain", "adapter": None})
    store.put("plain", encode_bundle(m0, {k: v for k, v in t.items() if k.startswith("head.")}))
    engine = Engine(minilm_backbone, store)
    rows = engine.encode(m, TEXTS)
    with_adapter = engine.run([RowRequest("ident", 1, r) for r in rows], keep_logits=True)
    without = engine.run([RowRequest("plain", 1, r) for r in rows], keep_logits=True)
    for a, b in zip(with_adapter, without):
        torch.testing.assert_close(a.logits, b.logits, atol=1e-6, rtol=0)
