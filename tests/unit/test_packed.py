"""Padding-free forwards equal padded ones, and the precision modes agree with float32 within stated bounds."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from service.bundles.codec import encode_bundle
from service.bundles.manifest import HeadType
from service.modeling.backbone import load_backbone
from service.modeling.packed import Packing
from service.runtime.engine import Engine, RowRequest
from tests.conftest import make_manifest
from tests.synthetic import random_tensors
from tests.unit.test_engine_mixed import QA, TASKS, TEXTS

# Rows of very different lengths: 3 tokens up to the tiny models' 128-position limit.
LONG = " ".join(["word"] * 150)
VARIED = ["ok", *TEXTS, LONG]


def engines(backbone_dir: str, store, strategy: str = "segment", **kw) -> tuple[Engine, Engine]:
    """Two engines on two loads of one backbone, sharing a store: packed and padded."""
    out = []
    for packing in ("on", "off"):
        backbone = load_backbone(backbone_dir, device="cpu", **kw)
        out.append(Engine(backbone, store, cache_max_slots=16, packing=packing, strategy=strategy,
                          max_seq_length=128))
    return out[0], out[1]


def fill(store, ref, tasks=TASKS) -> None:
    for i, (task, head, cfg) in enumerate(tasks):
        manifest = make_manifest(ref, task=task, head_type=head, adapter=cfg)
        store.put(task, encode_bundle(manifest, random_tensors(manifest, seed=i, std=0.2)))


def all_requests(engine: Engine) -> list[RowRequest]:
    reqs = []
    for task, head, _ in TASKS:
        manifest = engine.store.get_info(task, 1).manifest
        if head is HeadType.QA:
            rows = engine.encode(manifest, [q for q, _ in QA], [c for _, c in QA])
        elif task == "cls2":
            rows = engine.encode(manifest, VARIED[:3], VARIED[3:6])
        else:
            rows = engine.encode(manifest, VARIED)
        reqs += engine.requests(task, 1, manifest, rows)
    reqs += [RowRequest(None, 0, r) for r in engine.encode(None, VARIED)]
    return reqs


@pytest.mark.parametrize("strategy", ["segment", "gather"])
@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_the_packed_forward_equals_the_padded_one(tiny_model_dirs, store, kind, strategy):
    packed, padded = engines(str(tiny_model_dirs[kind]), store, strategy, dtype="float32")
    fill(store, packed.backbone.ref)
    assert packed.packed and not padded.packed
    reqs = all_requests(packed)
    assert max(len(r.row) for r in reqs) >= 120 and min(len(r.row) for r in reqs) <= 4  # RoBERTa: 126 positions
    order = torch.randperm(len(reqs), generator=torch.Generator().manual_seed(1)).tolist()
    mixed = [reqs[i] for i in order]
    for a, b in zip(packed.run(mixed, keep_logits=True), padded.run(mixed, keep_logits=True)):
        assert a.error is None and b.error is None, (a.error, b.error)
        torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=0)
        assert a.prediction.keys() == b.prediction.keys()
    for req in reqs[:1] + reqs[-1:]:  # a batch of one
        (a,), (b,) = packed.run([req], keep_logits=True), padded.run([req], keep_logits=True)
        torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=0)



def test_a_gather_layout_cut_into_pieces_equals_the_segment_path(tiny_model_dirs, store):
    """One task with many long rows beside tasks with one short row: the packed gather layout cuts the long
    task into pieces (`batch_plan.gather_pieces`); a head-only task's tokens sit between adapted ones (its
    slot between theirs), so the adapted tokens are not one range. Every row equals the segment path's
    (float32, atol 1e-5)."""
    path = str(tiny_model_dirs["bert"])
    gather, segment = (Engine(load_backbone(path, device="cpu", dtype="float32"), store, cache_max_slots=16,
                              packing="on", strategy=strategy, max_seq_length=128) for strategy in ("gather", "segment"))
    fill(store, gather.backbone.ref)
    tasks = ["cls", "headonly", "multi", "reg"]  # loaded in this order: slots 1, 2, 3, 4
    for engine in (gather, segment):
        for task in tasks:
            engine.cache.release(engine.cache.acquire(task, 1))
    reqs = []
    for task in tasks:
        manifest = gather.store.get_info(task, 1).manifest
        texts = [LONG, LONG, TEXTS[2], LONG] if task == "cls" else ["ok", TEXTS[0]]
        reqs += gather.requests(task, 1, manifest, gather.encode(manifest, texts))
    reqs += [RowRequest(None, 0, r) for r in gather.encode(None, ["plain row", "another plain row"])]
    seen = []
    original = gather.pool.routing_packed

    def spy(*args, **kwargs):
        seen.append(routing := original(*args, **kwargs))
        return routing

    gather.pool.routing_packed = spy
    for a, b in zip(gather.run(reqs, keep_logits=True), segment.run(reqs, keep_logits=True)):
        assert a.error is None and b.error is None, (a.error, b.error)
        torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=0)
    (routing,) = seen
    slots = routing.segment_slots.tolist()
    assert len(slots) > len(set(slots))  # the long task was cut into several pieces
    tokens = routing.real_tokens.tolist()
    assert tokens == sorted(tokens) and tokens[-1] - tokens[0] + 1 > len(tokens)  # a gap: the head-only task


def test_packing_places_tokens_and_pools_per_row():
    p = Packing.of([3, 1, 2], torch.device("cpu"))
    assert p.offsets == (0, 3, 4, 6) and p.tokens == 6 and p.max_length == 3 and not p.uniform
    assert p.row_of_token.tolist() == [0, 0, 0, 1, 2, 2]
    assert p.positions.tolist() == [0, 1, 2, 0, 0, 1]
    assert p.pad_index.tolist() == [0, 1, 2, 3, 6, 7]
    h = torch.arange(12, dtype=torch.float32).view(6, 2)
    assert p.pool(h, "cls").tolist() == [[0, 1], [6, 7], [8, 9]]
    assert p.pool(h, "mean").tolist() == [[2, 3], [6, 7], [9, 10]]
    padded = p.to_padded(h)
    assert padded.shape == (3, 3, 2) and padded[1, 1:].abs().sum() == 0
    torch.testing.assert_close(p.from_padded(padded), h)
    with pytest.raises(ValueError):
        Packing.of([2, 0], torch.device("cpu"))


# Reduced precisions against float32 on the tiny BERT (random weights, so logits of order 1): the bounds
# are what these formats can hold (bfloat16: 8 bits of mantissa through 2 layers; int8: per-channel weight
# scales and per-token activation scales), checked on max |difference| of every logit.
PRECISION_ATOL = {"bfloat16": 0.1, "int8": 0.15}


@pytest.mark.parametrize(("precision", "attention"), [
    ("bfloat16", None), ("bfloat16", torch.float32), ("int8", None)])  # attention: `Precision.attention_dtype`
@pytest.mark.parametrize("packing", ["on", "off"])
def test_reduced_precisions_agree_with_float32_and_mixed_still_equals_alone(tiny_model_dirs, store, precision,
                                                                             attention, packing):
    path = str(tiny_model_dirs["bert"])
    ref_engine = Engine(load_backbone(path, device="cpu", dtype="float32"), store, cache_max_slots=16,
                        packing=packing)
    backbone = load_backbone(path, device="cpu", dtype=precision)
    backbone.precision = replace(backbone.precision, attention_dtype=attention)  # each, whatever this CPU measures
    low = Engine(backbone, store, cache_max_slots=16, packing=packing)
    assert low.backbone.precision.mode == precision
    if attention is not None and packing == "off":  # padded forwards run the model's own attention: said so
        assert low.backbone.precision.attention_dtype is None
        assert "padded forwards: attention in bfloat16" in low.backbone.precision.reason
        return
    fill(store, ref_engine.backbone.ref)
    reqs = all_requests(ref_engine)
    reference = ref_engine.run(reqs, keep_logits=True)
    order = torch.randperm(len(reqs), generator=torch.Generator().manual_seed(2)).tolist()
    mixed = [reqs[i] for i in order]
    got = low.run(mixed, keep_logits=True)
    worst = 0.0
    for j, res in zip(order, got):
        assert res.error is None, res.error
        worst = max(worst, (res.logits - reference[j].logits).abs().max().item())
        (alone,) = low.run([mixed[order.index(j)]], keep_logits=True)
        # a mixed batch equals the row alone in this precision too (same kernels, up to summation order)
        torch.testing.assert_close(res.logits, alone.logits, atol=PRECISION_ATOL[precision] / 10, rtol=0)
    assert worst < PRECISION_ATOL[precision], worst
    assert worst > 0  # really computed in another precision


@pytest.mark.parametrize("ffn_out_dtype", [torch.float32, torch.bfloat16])
def test_int8_quantises_the_smoothed_projections_and_holds_the_feed_forward_output_apart(
        tiny_model_dirs, store, monkeypatch, ffn_out_dtype):
    from service.modeling import backbone as backbone_module
    from service.modeling.int8 import CastLinear, FbgemmKernel, Int8Linear, StackedInt8Linear
    from service.modeling.precision import Precision

    monkeypatch.setattr(backbone_module, "choose_precision", lambda *a, **k: Precision(
        "int8", torch.float32, "test", ffn_out_dtype))
    backbone = load_backbone(str(tiny_model_dirs["bert"]), device="cpu", dtype="int8")
    for layer in backbone.model.encoder.layer:
        sa = layer.attention.self
        qkv = (sa.query, sa.key, sa.value)
        if ffn_out_dtype is torch.float32:  # the recipe stacks query, key and value under one smoothing
            assert all(isinstance(proj, StackedInt8Linear) and proj.stack is sa.query.stack for proj in qkv)
            assert [(p.lo, p.hi) for p in qkv] == [(0, 32), (32, 64), (64, 96)]  # the tiny BERT's width: 32
            inv_scale = sa.query.stack.inv_scale
            assert inv_scale is not None and inv_scale.shape == (32,) and (inv_scale > 0).all()
            alone: tuple[torch.nn.Module, ...] = ()
        else:  # with a bfloat16 feed-forward output: each its own smoothing, fbgemm's kernel (docs/accuracy.md)
            assert all(isinstance(proj.kernel, FbgemmKernel) for proj in qkv)
            alone = qkv
        for proj in (*alone, layer.attention.output.dense, layer.intermediate.dense):
            assert isinstance(proj, Int8Linear)
            assert proj.inv_scale.shape == (proj.in_features,) and (proj.inv_scale > 0).all()
        ffn_out = layer.output.dense
        if ffn_out_dtype is torch.float32:
            assert type(ffn_out) is torch.nn.Linear and ffn_out.weight.dtype is torch.float32
        else:
            assert isinstance(ffn_out, CastLinear) and ffn_out.dtype is torch.bfloat16
    assert all(type(m) is torch.nn.Embedding for m in backbone.model.embeddings.children()
               if isinstance(m, torch.nn.Embedding))
    assert backbone.dtype is torch.float32
    f32 = load_backbone(str(tiny_model_dirs["bert"]), device="cpu", dtype="float32")
    assert backbone.ref.fingerprint == f32.ref.fingerprint  # bundles trained on float32 weights still match


@pytest.mark.parametrize(("tokens", "longest", "rows"), [
    (0, 30, []),
    (5, 30, [5]),
    (30, 30, [30]),
    (63, 30, [30, 30, 3]),
    (63, 64, [63]),
    (7, 1, [1] * 7),
    (0, 0, []),
])
def test_filler_rows_are_never_longer_than_the_batch_s_longest_row(tokens, longest, rows):
    from service.runtime.engine import filler_rows

    assert filler_rows(tokens, longest) == rows


def test_bfloat16_packed_batches_round_their_token_count_up(tiny_model_dirs, store, monkeypatch):
    """On CPU in bfloat16 a packed batch is padded to a multiple of 64 tokens by filler rows (every distinct
    matmul shape costs memory there), none longer than the batch's longest row (attention pads every row to the
    longest); the fillers get no adapter and change no real row."""
    import service.runtime.engine as engine_module

    path = str(tiny_model_dirs["bert"])
    bf16 = Engine(load_backbone(path, device="cpu", dtype="bfloat16"), store, cache_max_slots=16, packing="on")
    assert bf16.token_bucket == 64
    assert Engine(load_backbone(path, device="cpu", dtype="float32"), store, packing="on").token_bucket == 1
    fill(store, bf16.backbone.ref)
    packings: list[tuple[int, ...]] = []  # the batches' packings (after the backbone's load: its probes pack too)
    of = engine_module.Packing.of
    monkeypatch.setattr(engine_module.Packing, "of",
                        lambda lengths, device: packings.append(tuple(lengths)) or of(lengths, device))
    seen: list[int] = []
    original = bf16.pool.routing_packed

    def spy(segments, offsets, strategy, total_tokens=None, bucket_shapes=False):
        assert bucket_shapes
        seen.append(total_tokens)
        routing = original(segments, offsets, strategy, total_tokens, bucket_shapes)
        if routing.segment_slots is not None:  # the gather layout is bucketed too: k a multiple of 4
            assert len(routing.segment_slots) % 4 == 0
        assert routing.token_slots is not None and len(routing.token_slots) == total_tokens
        assert set(routing.token_slots[offsets[-1]:].tolist()) <= {0}  # the filler: no adapter
        return routing

    bf16.pool.routing_packed = spy
    reqs = all_requests(bf16)
    mixed = bf16.run(reqs, keep_logits=True)
    alone = [bf16.run([r], keep_logits=True)[0] for r in reqs[:6]]
    assert all(n is not None and n % 64 == 0 for n in seen)
    assert len(packings) == 1 + 6 and all(sum(lengths) % 64 == 0 for lengths in packings)
    # the fillers come after the rows, none longer than the longest row
    assert max(packings[0]) == max(len(r.row) for r in reqs)
    for lengths, r in zip(packings[1:], reqs):
        assert lengths[0] == max(lengths) == len(r.row)
    for a, b in zip(mixed, alone):
        torch.testing.assert_close(a.logits, b.logits, atol=PRECISION_ATOL["bfloat16"] / 10, rtol=0)


def test_attention_reads_adjacent_query_key_value_columns_in_place_and_gives_the_stacked_result():
    from service.modeling.packed import Packing, adjacent_columns, packed_attention

    g = torch.Generator().manual_seed(0)
    packing = Packing.of([3, 5, 1], torch.device("cpu"))
    fused = torch.randn(9, 3 * 8, generator=g)  # one stacked projection's output, [N, 3d]
    q, k, v = fused[:, :8], fused[:, 8:16], fused[:, 16:]
    assert adjacent_columns(q, k, v) is not None
    assert adjacent_columns(q, v, k) is None and adjacent_columns(q.clone(), k, v) is None
    separate = [t.contiguous() for t in (q, k, v)]
    assert adjacent_columns(*separate) is None
    torch.testing.assert_close(packed_attention(q, k, v, 2, packing), packed_attention(*separate, 2, packing),
                               atol=0, rtol=0)
    uniform = Packing.of([3, 3, 3], torch.device("cpu"))
    torch.testing.assert_close(packed_attention(q, k, v, 2, uniform), packed_attention(*separate, 2, uniform),
                               atol=0, rtol=0)


def test_attention_in_float32_on_bfloat16_inputs_is_float32_attention_rounded_once():
    """`Precision.attention_dtype`: the bfloat16 mode's packed attention computed in float32 gives exactly float32
    attention of the same (bfloat16) query, key and value, rounded to bfloat16 at the end."""
    from service.modeling.packed import packed_attention

    g = torch.Generator().manual_seed(0)
    packing = Packing.of([5, 2, 7], torch.device("cpu"))
    q, k, v = (torch.randn(14, 16, generator=g).to(torch.bfloat16) for _ in range(3))
    got = packed_attention(q, k, v, 2, packing, torch.float32)
    assert got.dtype is torch.bfloat16
    want = packed_attention(q.float(), k.float(), v.float(), 2, packing).to(torch.bfloat16)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
