"""The engine's invariants: a mixed-task batch equals each row run alone; untrained adapters are identity;
padding does not change a row; failures stay per row; versions never mix."""

from __future__ import annotations

import pytest
import torch

from service.bundles.codec import encode_bundle
from service.bundles.manifest import AdapterConfig, HeadType
from service.errors import TaskNotFound, VersionNotFound
from service.modeling.backbone import load_backbone
from service.modeling.bottleneck import adapter_tensors, attach_adapters
from service.modeling.slot_pool import default_strategy
from service.runtime.engine import Engine, RowRequest
from tests.conftest import make_manifest
from tests.synthetic import random_tensors

ATOL = 1e-5

# (task, head type, adapter config): every head type, both placements, several bottlenecks (the pool
# grows), all activations, a trained LayerNorm, and a head-only task.
TASKS = [
    ("cls", HeadType.CLASSIFICATION, AdapterConfig(bottleneck=8)),
    ("multi", HeadType.MULTILABEL, AdapterConfig(placement="pfeiffer", bottleneck=4, activation="relu")),
    ("reg", HeadType.REGRESSION, AdapterConfig(bottleneck=16, activation="swish", train_layernorm=True)),
    ("ner", HeadType.TOKEN_CLASSIFICATION, AdapterConfig(bottleneck=8)),
    ("qa", HeadType.QA, AdapterConfig(placement="pfeiffer", bottleneck=8)),
    ("headonly", HeadType.CLASSIFICATION, None),
    ("cls2", HeadType.CLASSIFICATION, AdapterConfig(bottleneck=8, train_layernorm=True)),
]
TEXTS = [
    "John Smith flew from Paris to Berlin on Monday.",
    "great film",
    "The committee, after a very long and rather heated debate about the budget, postponed the vote again.",
    "Is it raining?",
]
QA = [("Where did John fly?", TEXTS[0]), ("What was postponed?", TEXTS[2])]


def build_engine(backbone, store, tasks=TASKS, **kw) -> Engine:
    for i, (task, head, cfg) in enumerate(tasks):
        manifest = make_manifest(backbone.ref, task=task, head_type=head, adapter=cfg)
        store.put(task, encode_bundle(manifest, random_tensors(manifest, seed=i, std=0.2)))
    return Engine(backbone, store, cache_max_slots=16, **kw)


def requests_for(engine: Engine, task: str, version: int = 1) -> list[RowRequest]:
    manifest = engine.store.get_info(task, version).manifest
    if manifest.head_type is HeadType.QA:
        rows = engine.encode(manifest, [q for q, _ in QA], [c for _, c in QA])
    elif task == "cls2":  # a sentence-pair task
        rows = engine.encode(manifest, TEXTS[:2], TEXTS[2:])
    else:
        rows = engine.encode(manifest, TEXTS)
    return [RowRequest(task, version, r) for r in rows]


def alone(engine: Engine, req: RowRequest):
    (res,) = engine.run([req], keep_logits=True)
    assert res.error is None, res.error
    return res


MODES = {"padded-segment": dict(strategy="segment", packing="off"),
         "padded-gather": dict(strategy="gather", packing="off"),
         "packed-segment": dict(strategy="segment", packing="on"),
         "packed-gather": dict(strategy="gather", packing="on")}


@pytest.mark.parametrize("mode", list(MODES))
def test_mixed_batch_equals_each_row_alone_for_every_head_type(tiny_backbone, store, mode):
    engine = build_engine(tiny_backbone, store, **MODES[mode])
    assert engine.packed is mode.startswith("packed")
    reqs = [r for task, _, _ in TASKS for r in requests_for(engine, task)]
    reqs += [RowRequest(None, 0, r) for r in engine.encode(None, TEXTS[:2])]  # plain-backbone rows too
    order = torch.randperm(len(reqs), generator=torch.Generator().manual_seed(0)).tolist()
    mixed = [reqs[i] for i in order]  # tasks interleaved, as traffic arrives
    results = engine.run(mixed, keep_logits=True)
    for req, res in zip(mixed, results):
        assert res.error is None, res.error
        ref = alone(engine, req)
        torch.testing.assert_close(res.logits, ref.logits, atol=ATOL, rtol=0)
        assert res.prediction.keys() == ref.prediction.keys()
    # the tasks really differ: the same text through two tasks gives different outputs
    a = engine.run(requests_for(engine, "cls")[:1], keep_logits=True)[0].logits
    b = engine.run(requests_for(engine, "headonly")[:1], keep_logits=True)[0].logits
    assert (a - b).abs().max() > 1e-3


@pytest.mark.parametrize(("device", "threads", "dtype", "expected"), [
    ("cuda", 1, torch.float16, "gather"), ("cuda", 8, torch.bfloat16, "gather"),  # few kernel launches
    ("cpu", 1, torch.float32, "segment"),  # one thread per forward: per-task matmuls on real tokens only
    ("cpu", 2, torch.float32, "gather"), ("cpu", 16, torch.float32, "gather"),  # bmm splits across threads
    ("cpu", 1, torch.bfloat16, "gather"),  # small bfloat16 matmuls cost more each than one batched one
])
def test_auto_strategy_follows_the_device_threads_and_dtype(device, threads, dtype, expected):
    assert default_strategy(torch.device(device), threads, dtype) == expected


def test_auto_strategy_is_chosen_per_forward_and_unknown_ones_are_refused(tiny_backbone, store):
    engine = build_engine(tiny_backbone, store)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert engine.resolved_strategy() == "segment"
        torch.set_num_threads(2)
        assert engine.resolved_strategy() == "gather"
    finally:
        torch.set_num_threads(before)
    engine.strategy = "segment"
    assert engine.resolved_strategy() == "segment"
    with pytest.raises(ValueError, match="strategy"):
        Engine(tiny_backbone, store, strategy="fastest")


@pytest.mark.parametrize("kind", ["roberta", "distilbert"])
def test_mixed_batch_equals_alone_on_other_architectures(tiny_model_dirs, store, kind):
    backbone = load_backbone(str(tiny_model_dirs[kind]), device="cpu", dtype="float32")
    engine = build_engine(backbone, store)
    assert engine.packed is (kind == "roberta")  # DistilBERT has another layer layout: padded forwards
    reqs = [r for task, _, _ in TASKS for r in requests_for(engine, task)]
    for req, res in zip(reqs, engine.run(reqs, keep_logits=True)):
        torch.testing.assert_close(res.logits, alone(engine, req).logits, atol=ATOL, rtol=0)


def _untrained_adapter_bundle(backbone_dir: str, ref, task: str, cfg: AdapterConfig, up_init_std: float) -> bytes:
    """A bundle whose adapters come straight from the training-time initialisation."""
    scratch = load_backbone(backbone_dir, device="cpu", dtype="float32")
    added = attach_adapters(scratch.model, scratch.spec, cfg, ref.hidden_size, up_init_std=up_init_std)
    manifest = make_manifest(ref, task=task, adapter=cfg)
    head = {k: v for k, v in random_tensors(manifest, seed=3).items() if k.startswith("head.")}
    return encode_bundle(manifest, {**adapter_tensors(added), **head})


def _hidden(engine: Engine, rows, slot: int) -> torch.Tensor:
    from service.modeling.batch_plan import Segment

    batch = engine.encoder.collate(rows, engine.backbone.device)
    with torch.inference_mode():
        routing = engine.pool.routing([Segment(slot, 0, len(rows))], engine.resolved_strategy(), [len(r) for r in rows])
        with engine.pool.route(routing):
            return engine.backbone.model(**batch).last_hidden_state.clone()


@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_untrained_adapter_leaves_the_backbone_unchanged(tiny_model_dirs, tiny_backbone, store, placement):
    cfg = AdapterConfig(placement=placement, bottleneck=8, train_layernorm=True)
    store.put("zero", _untrained_adapter_bundle(str(tiny_model_dirs["bert"]), tiny_backbone.ref, "zero", cfg, 0.0))
    store.put("near", _untrained_adapter_bundle(str(tiny_model_dirs["bert"]), tiny_backbone.ref, "near", cfg, 1e-3))
    engine = Engine(tiny_backbone, store)
    rows = engine.encode(None, TEXTS)
    plain = _hidden(engine, rows, 0)
    zero, near = engine.cache.acquire("zero", 1), engine.cache.acquire("near", 1)
    try:
        torch.testing.assert_close(_hidden(engine, rows, zero.slot), plain, atol=1e-6, rtol=0)
        diff = (_hidden(engine, rows, near.slot) - plain).abs().max().item()
        assert 0 < diff < 1e-2  # near-identity: ~1e-3 up-projection moves outputs, but only a little
    finally:
        engine.cache.release(zero)
        engine.cache.release(near)


def test_padding_does_not_change_a_row(tiny_backbone, store):
    engine = build_engine(tiny_backbone, store)
    short = requests_for(engine, "cls")[1]  # "great film"
    long_same = requests_for(engine, "cls")[2]
    long_other = requests_for(engine, "ner")[2]
    ref = alone(engine, short).logits
    for batch in ([short, long_same], [long_other, short, long_same]):
        res = engine.run(batch, keep_logits=True)
        torch.testing.assert_close(res[batch.index(short)].logits, ref, atol=ATOL, rtol=0)


def test_plain_backbone_rows_are_mean_pooled_embeddings(tiny_backbone, store):
    engine = build_engine(tiny_backbone, store)
    rows = engine.encode(None, TEXTS)
    out = engine.run([RowRequest(None, 0, r) for r in rows])
    emb = torch.tensor(out[0].prediction["embedding"])
    batch = engine.encoder.collate(rows[:1], engine.backbone.device)
    with torch.inference_mode():
        h = engine.backbone.model(**batch).last_hidden_state[0]
    torch.testing.assert_close(emb, torch.nn.functional.normalize(h.mean(0), dim=-1), atol=1e-5, rtol=0)


def test_a_failing_task_fails_only_its_rows(tiny_backbone, store):
    engine = build_engine(tiny_backbone, store)
    good = requests_for(engine, "cls")[:2]
    rows = engine.encode(None, TEXTS[:2])
    bad = [RowRequest("missing", 1, rows[0]), RowRequest("cls", 9, rows[1])]
    results = engine.run([good[0], bad[0], good[1], bad[1]])
    assert results[0].error is None and results[2].error is None
    assert isinstance(results[1].error, TaskNotFound)
    assert isinstance(results[3].error, VersionNotFound)
    assert engine.cache.stats.resident_entries >= 1
    assert all(e.pins == 0 for e in engine.cache.resident())  # nothing left pinned


def test_two_versions_in_one_batch_each_use_their_own_weights(tiny_backbone, store):
    engine = build_engine(tiny_backbone, store, tasks=TASKS[:1])
    m = make_manifest(tiny_backbone.ref, task="cls", adapter=AdapterConfig(bottleneck=8))
    store.put("cls", encode_bundle(m, random_tensors(m, seed=99, std=0.2)))
    v1, v2 = requests_for(engine, "cls", 1)[0], requests_for(engine, "cls", 2)[0]
    r1, r2 = engine.run([v1, v2], keep_logits=True)
    torch.testing.assert_close(r1.logits, alone(engine, v1).logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(r2.logits, alone(engine, v2).logits, atol=ATOL, rtol=0)
    assert (r1.logits - r2.logits).abs().max() > 1e-3


def test_truncated_inputs_are_flagged(tiny_backbone, store):
    engine = build_engine(tiny_backbone, store, tasks=TASKS[:1], max_seq_length=12)
    (res,) = engine.run(requests_for(engine, "cls")[2:3])
    assert res.prediction["truncated"] is True
    (res,) = engine.run(requests_for(engine, "cls")[1:2])
    assert "truncated" not in res.prediction
