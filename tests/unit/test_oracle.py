"""The engine against an independent oracle (`tests/oracle/reference.py`): every row of a mixed-task batch
must get the logits that a plain, one-task, one-row forward of the same bundle gives, on every architecture
and every slot-pool mode (padded / packed x segment / gather). A last test breaks the slot pool on purpose
and checks that this comparison notices."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from service.bundles.codec import encode_bundle
from service.bundles.manifest import LORA_TARGETS, AdapterConfig, HeadType, LoraConfig, Manifest
from service.bundles.store import LocalAdapterStore
from service.modeling.backbone import load_backbone
from service.modeling.encoding import Encoder
from service.modeling.lora import LoraPool
from service.modeling.slot_pool import Routing, SlotPool
from service.runtime.engine import Engine, RowRequest
from tests.conftest import make_manifest
from tests.oracle.reference import Oracle
from tests.synthetic import random_tensors

ATOL = 1e-4  # float32; the engine runs SDPA (and packed attention), the oracle eager attention

# (task, head type, adapter config, head config): every head type, both placements, every activation, task
# LayerNorms on both placements, bottlenecks from 4 to 72 (72 > the pool's initial 64: the pool grows), both
# poolings, with and without the hidden layer, and a head on the plain backbone.
TASKS = [
    ("cls", HeadType.CLASSIFICATION, AdapterConfig(bottleneck=8), {}),
    ("pair", HeadType.CLASSIFICATION, AdapterConfig(bottleneck=6, activation="relu", train_layernorm=True),
     {"pooling": "cls"}),
    ("multi", HeadType.MULTILABEL, AdapterConfig(placement="pfeiffer", bottleneck=4, activation="relu"),
     {"hidden_layer": False}),
    ("reg", HeadType.REGRESSION, AdapterConfig(bottleneck=72, activation="swish", train_layernorm=True),
     {"pooling": "cls"}),
    ("ner", HeadType.TOKEN_CLASSIFICATION,
     AdapterConfig(placement="pfeiffer", bottleneck=12, activation="swish", train_layernorm=True), {}),
    ("qa", HeadType.QA, AdapterConfig(bottleneck=8), {}),
    ("headonly", HeadType.CLASSIFICATION, None, {"pooling": "cls"}),
    # AdapterHub's seq_bn wiring (the adapter reads the LayerNorm's output): the feed-forward point only, and
    # both points
    ("normed", HeadType.CLASSIFICATION, AdapterConfig(placement="pfeiffer", bottleneck=8, activation="relu",
                                                       reads="normed"), {"pooling": "cls"}),
    ("normed-both", HeadType.TOKEN_CLASSIFICATION, AdapterConfig(bottleneck=6, activation="swish",
                                                                 reads="normed"), {}),
    # adapters with LayerNorms of their own (AdapterHub's ln_before / ln_after), reading the projection or the
    # LayerNorm output
    ("own-norms", HeadType.CLASSIFICATION, AdapterConfig(bottleneck=8, ln_before=True, ln_after=True),
     {"pooling": "cls"}),
    ("own-norm-after-normed", HeadType.REGRESSION, AdapterConfig(placement="pfeiffer", bottleneck=4,
                                                                 reads="normed", ln_after=True, ln_eps=1e-6),
     {"pooling": "mean"}),
    # LoRA tasks (as imported from PEFT) in the same batches: query + value at rank 4, and every target at
    # rank 12 (> the LoRA pool's initial rank capacity of 8: the pool grows)
    ("lora-qv", HeadType.CLASSIFICATION, LoraConfig(rank=4, scaling=2.0, targets=("query", "value")),
     {"pooling": "cls"}),
    ("lora-all", HeadType.TOKEN_CLASSIFICATION, LoraConfig(rank=12, scaling=0.5, targets=LORA_TARGETS), {}),
]
TEXTS = [
    "Hi",
    "John Smith flew from Paris to Berlin on Monday.",
    "The committee, after a very long and rather heated debate about the budget, the schools, the roads and "
    "the new hospital in the north of the county, postponed the vote again until the spring session.",
    "great film",
]
PAIRS = [(TEXTS[1], TEXTS[3]), (TEXTS[0], TEXTS[2]), (TEXTS[3], TEXTS[0])]
QA = [("Where did John fly?", TEXTS[1]), ("What was postponed?", TEXTS[2]), ("Who?", "Ann.")]
UNIFORM = "a b c d"  # one text for a batch without padding (the padded segment path's in-place branch)

MODES = {"padded-segment": dict(strategy="segment", packing="off"),
         "padded-gather": dict(strategy="gather", packing="off"),
         "packed-segment": dict(strategy="segment", packing="on"),
         "packed-gather": dict(strategy="gather", packing="on")}
KINDS = ("bert", "roberta", "distilbert")


@dataclasses.dataclass
class Case:
    """One architecture's store, batches and oracle logits (computed once, shared by every mode)."""

    kind: str
    model_dir: str
    store: LocalAdapterStore
    mixed: list[RowRequest]  # tasks interleaved, very different lengths
    uniform: list[RowRequest]  # every row the same length
    expected: dict[int, torch.Tensor]  # id(request) -> oracle logits


def _rows(encoder: Encoder, head: HeadType, task: str):
    if head is HeadType.QA:
        return encoder.encode([q for q, _ in QA], [c for _, c in QA], qa=True)
    if task == "pair":
        return encoder.encode([a for a, _ in PAIRS], [b for _, b in PAIRS])
    return encoder.encode(TEXTS)


def _build_case(kind: str, model_dir: str, root) -> Case:
    backbone = load_backbone(model_dir, device="cpu", dtype="float32")  # for its ref and tokenizer only
    encoder = Encoder(backbone.tokenizer, min(256, backbone.max_length), backbone.uses_token_type_ids)
    store = LocalAdapterStore(root / "store")
    oracle = Oracle(model_dir)
    mixed, uniform, expected = [], [], {}
    for i, (task, head, cfg, head_cfg) in enumerate(TASKS):
        if isinstance(cfg, LoraConfig):
            manifest = make_manifest(backbone.ref, task=task, head_type=head, adapter=None, **head_cfg)
            manifest = Manifest.model_validate({**manifest.model_dump(), "lora": cfg})
        else:
            manifest = make_manifest(backbone.ref, task=task, head_type=head, adapter=cfg, **head_cfg)
        tensors = random_tensors(manifest, seed=i, std=0.2)
        assert store.put(task, encode_bundle(manifest, tensors)).version == 1
        reqs = [RowRequest(task, 1, r) for r in _rows(encoder, head, task)]
        if head is not HeadType.QA and task != "pair":
            reqs.append(RowRequest(task, 1, encoder.encode([UNIFORM])[0]))
            uniform.append(reqs[-1])
            mixed += reqs[:-1]
        else:
            mixed += reqs
        for req, out in zip(reqs, oracle.logits(manifest, tensors, [q.row for q in reqs])):
            expected[id(req)] = out
    plain = [RowRequest(None, 0, r) for r in encoder.encode([TEXTS[0], TEXTS[2], UNIFORM])]  # slot 0 rows
    for req, out in zip(plain, oracle.logits(None, None, [q.row for q in plain])):
        expected[id(req)] = out
    mixed += plain[:2]
    uniform.append(plain[2])
    order = torch.randperm(len(mixed), generator=torch.Generator().manual_seed(0)).tolist()
    mixed = [mixed[j] for j in order]
    lengths = [len(r.row) for r in mixed]
    assert min(lengths) <= 4 and max(lengths) >= 40  # plenty of padding in the padded forward
    assert len({len(r.row) for r in uniform}) == 1
    return Case(kind, model_dir, store, mixed, uniform, expected)


@pytest.fixture(scope="module")
def cases(tiny_model_dirs, tmp_path_factory) -> dict[str, Case]:
    return {kind: _build_case(kind, str(tiny_model_dirs[kind]), tmp_path_factory.mktemp(f"oracle-{kind}"))
            for kind in KINDS}


def engine_for(case: Case, mode: str) -> Engine:
    """A fresh backbone per engine: the engine patches the model in place."""
    backbone = load_backbone(case.model_dir, device="cpu", dtype="float32")
    engine = Engine(backbone, case.store, cache_max_slots=16, **MODES[mode])
    assert engine.packed is (mode.startswith("packed") and case.kind != "distilbert")  # DistilBERT: padded
    return engine


def assert_matches_oracle(engine: Engine, case: Case, requests: list[RowRequest], atol: float = ATOL) -> None:
    """Run `requests` as ONE batch; every row's logits must equal the oracle's (all mismatches reported)."""
    results = engine.run(requests, keep_logits=True)
    bad = []
    for req, res in zip(requests, results):
        assert res.error is None, f"{req.task}: {res.error!r}"
        want = case.expected[id(req)]
        got = res.logits
        if got.shape != want.shape:
            bad.append(f"{req.task} row of {len(req.row)} tokens: shape {tuple(got.shape)} != {tuple(want.shape)}")
            continue
        diff = (got - want).abs().max().item()
        if not diff <= atol:
            bad.append(f"{req.task} row of {len(req.row)} tokens: max |engine - oracle| = {diff:.3g}")
    assert not bad, f"{case.kind}: {len(bad)}/{len(requests)} rows differ from the oracle:\n" + "\n".join(bad)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("kind", KINDS)
def test_mixed_batch_matches_the_oracle(cases, kind, mode):
    case = cases[kind]
    engine = engine_for(case, mode)
    assert_matches_oracle(engine, case, case.mixed)
    assert_matches_oracle(engine, case, case.uniform)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("precision", ["bfloat16", "int8", "int8-ffn-out-bfloat16"])
def test_a_mixed_batch_with_lora_equals_each_row_alone_in_the_reduced_precisions(cases, precision, mode,
                                                                                 monkeypatch):
    """bfloat16 and both int8 recipes (`int8.RECIPES`: with a float32 feed-forward output, query, key and value
    share one stacked matmul into whose result LoRA adds its delta in place) on the mixed batch of bottleneck
    and LoRA tasks: each row as it is alone, and near the oracle (the bounds of tests/unit/test_packed.py's
    PRECISION_ATOL)."""
    from service.modeling import backbone as backbone_module
    from service.modeling.int8 import StackedInt8Linear
    from service.modeling.precision import Precision

    dtype, _, ffn_out = precision.partition("-ffn-out-")
    if dtype == "int8":  # the recipe by its feed-forward output dtype, whatever this CPU's probe would pick
        monkeypatch.setattr(backbone_module, "choose_precision", lambda *a, **k: Precision(
            "int8", torch.float32, "test", getattr(torch, ffn_out or "float32")))
    case = cases["bert"]
    engine = Engine(load_backbone(case.model_dir, device="cpu", dtype=dtype), case.store, cache_max_slots=16,
                    **MODES[mode])
    assert engine.backbone.precision.mode == dtype
    stacked = isinstance(engine.backbone.model.encoder.layer[0].attention.self.query.base, StackedInt8Linear)
    assert stacked is (precision == "int8")
    from service.modeling import packed as packed_module

    fused, adjacent = [0], packed_module.adjacent_columns

    def spy(q, k, v):
        found = adjacent(q, k, v)
        fused[0] += found is not None
        return found

    monkeypatch.setattr(packed_module, "adjacent_columns", spy)
    results = engine.run(case.mixed, keep_logits=True)
    assert {r.task for r in case.mixed} >= {"lora-qv", "lora-all", "cls"}
    worst = 0.0
    for req, res in zip(case.mixed, results):
        assert res.error is None, res.error
        (alone,) = engine.run([req], keep_logits=True)
        # bfloat16: a padded batch's other lengths move a logit of magnitude 2-4 by a step or two of its grid
        # (1/64); int8: per-token scales make a row nearly independent of its batch
        torch.testing.assert_close(res.logits, alone.logits, atol=0.04 if precision == "bfloat16" else 0.015, rtol=0)
        worst = max(worst, (res.logits - case.expected[id(req)]).abs().max().item())
    assert 0 < worst < 0.15, worst
    # packed and stacked: attention read query, key and value in place (LoRA's in-place adds kept them there)
    assert (fused[0] > 0) is (stacked and engine.packed)


def test_the_tasks_really_differ(cases):
    """Guards the oracle test against a vacuous pass: on the same text, tasks give different outputs, and
    adapters move the hidden states away from the plain backbone."""
    case = cases["bert"]
    by_task = {r.task: case.expected[id(r)] for r in case.uniform}
    assert (by_task["cls"] - by_task["headonly"]).abs().max() > 1e-2
    oracle = Oracle(case.model_dir)
    row = case.uniform[0].row
    plain = oracle.hidden(row.input_ids, row.token_type_ids)
    for task in ("reg", "lora-all"):  # a bottleneck task and a LoRA task
        manifest = case.store.get_info(task, 1).manifest
        tensors = random_tensors(manifest, seed=[t for t, *_ in TASKS].index(task), std=0.2)
        handles = oracle._install(manifest, tensors)
        try:
            adapted = oracle.hidden(row.input_ids, row.token_type_ids)
        finally:
            for h in handles:
                h.remove()
        assert (adapted - plain).abs().max() > 1e-2, task


# --- the oracle test can fail: subtly broken slot pools ----------------------------------------------------

def _drop_up_bias(monkeypatch):
    """Padded gather forgets the up-projection's bias."""
    def broken(self, p, h, r):
        idx = r.row_slots
        z = torch.baddbmm(self.down_b[p].index_select(0, idx).unsqueeze(1), h, self.down_w[p].index_select(0, idx))
        return h.baddbmm_(self._activate(z, r), self.up_w[p].index_select(0, idx))
    monkeypatch.setattr(SlotPool, "_apply_gather", broken)


def _swap_two_slots(monkeypatch):
    """Packed segment: two tasks' token ranges go through each other's adapters."""
    original = SlotPool.routing_packed

    def broken(self, segments, offsets, strategy, *args, **kwargs):
        adapted = [i for i, s in enumerate(segments) if s.slot in self.specs]
        segs = list(segments)
        if len(adapted) >= 2:
            a, b = adapted[:2]
            segs[a], segs[b] = (dataclasses.replace(segs[a], slot=segments[b].slot),
                                dataclasses.replace(segs[b], slot=segments[a].slot))
        return original(self, segs, offsets, strategy, *args, **kwargs)
    monkeypatch.setattr(SlotPool, "routing_packed", broken)


def _reverse_gather_slots(monkeypatch):
    """Packed gather: the [k, L] layout's tasks read their weights from the wrong slots."""
    original = SlotPool.routing_packed

    def broken(self, segments, offsets, strategy, *args, **kwargs):
        r = original(self, segments, offsets, strategy, *args, **kwargs)
        if r.segment_slots is None:
            return r
        return dataclasses.replace(r, segment_slots=r.segment_slots.flip(0))
    monkeypatch.setattr(SlotPool, "routing_packed", broken)


def _ignore_task_norms(monkeypatch):
    """Padded segment: the tasks' own LayerNorms are never applied (the backbone's are)."""
    monkeypatch.setattr(Routing, "any_norm", property(lambda self: False))


def _lora_unscaled(monkeypatch):
    """LoRA tasks' B is copied without the task's scaling (alpha / r)."""
    original = LoraPool.write

    def broken(self, slot, cfg, tensors):
        original(self, slot, cfg.model_copy(update={"scaling": 1.0}), tensors)
    monkeypatch.setattr(LoraPool, "write", broken)


MUTATIONS = {"padded-gather": _drop_up_bias, "packed-segment": _swap_two_slots,
             "packed-gather": _reverse_gather_slots, "padded-segment": _ignore_task_norms}


@pytest.mark.parametrize("mode", list(MUTATIONS))
def test_a_subtly_broken_slot_pool_is_caught(cases, monkeypatch, mode):
    case = cases["bert"]
    MUTATIONS[mode](monkeypatch)
    engine = engine_for(case, mode)
    with pytest.raises(AssertionError, match="differ from the oracle"):
        assert_matches_oracle(engine, case, case.mixed)


@pytest.mark.parametrize("mode", list(MODES))
def test_a_broken_lora_pool_is_caught(cases, monkeypatch, mode):
    case = cases["bert"]
    _lora_unscaled(monkeypatch)
    engine = engine_for(case, mode)
    with pytest.raises(AssertionError, match=r"lora-(qv|all) row"):
        assert_matches_oracle(engine, case, case.mixed)


@pytest.mark.parametrize("mode", list(MODES))
def test_an_adapter_layernorm_left_out_is_caught(cases, monkeypatch, mode):
    """The adapters' own LayerNorm after the up-projection is skipped: the rows of both tasks that have one
    (reading the projection, and reading the LayerNorm output) must differ from the oracle."""
    original = SlotPool._separate_adapter

    def broken(x, v):
        return original(x, (v[0], v[1], None, v[3]))
    monkeypatch.setattr(SlotPool, "_separate_adapter", staticmethod(broken))
    case = cases["bert"]
    engine = engine_for(case, mode)
    with pytest.raises(AssertionError, match=r"own-norm"):
        assert_matches_oracle(engine, case, case.mixed)


def two_slot_engine(case: Case, mode: str) -> tuple[Engine, dict[str, list[RowRequest]]]:
    """An engine with two device slots in `mode`, and the case's mixed rows by task."""
    backbone = load_backbone(case.model_dir, device="cpu", dtype="float32")
    engine = Engine(backbone, case.store, cache_max_slots=2, **MODES[mode])
    by_task: dict[str, list[RowRequest]] = {}
    for req in case.mixed:
        by_task.setdefault(req.task, []).append(req)
    return engine, by_task


# task LayerNorms; LoRA on every projection; adapter LayerNorms
@pytest.mark.parametrize("before", ["pair", "lora-all", "own-norms"])
@pytest.mark.parametrize("mode", list(MODES))
def test_a_head_only_task_in_a_reused_slot_reads_nothing_stale(cases, mode, before):
    """Two slots. A head-only task takes the slot of a task with its own LayerNorms (or of a LoRA task) and
    shares a batch with a task that makes the forward read every row's norms (or LoRA weights): its rows
    must still see the plain backbone."""
    case = cases["bert"]
    engine, by_task = two_slot_engine(case, mode)
    partner = {"pair": "reg", "lora-all": "lora-qv", "own-norms": "own-norm-after-normed"}[before]  # also trains norms / also LoRA
    engine.run(by_task[before])
    engine.run(by_task[partner])  # the least recently used is now `before`: the head-only task gets its slot
    assert_matches_oracle(engine, case, by_task["headonly"] + by_task[partner])


@pytest.mark.parametrize("mode", list(MODES))
def test_a_narrow_pfeiffer_task_in_a_wide_houlsby_tasks_slot_reads_nothing_stale(cases, mode):
    """A slot write zeroes only what the slot's previous task wrote: a Pfeiffer task with m = 4 takes the slot
    of a Houlsby task with m = 72 (every point, wider than the pool was) and shares a batch with a Houlsby
    task; its rows must see zero at the attention points and beyond its own 4 columns."""
    case = cases["bert"]
    engine, by_task = two_slot_engine(case, mode)
    engine.run(by_task["reg"])
    engine.run(by_task["cls"])  # the least recently used is now `reg`: `multi` gets its slot
    assert_matches_oracle(engine, case, by_task["multi"] + by_task["cls"])
