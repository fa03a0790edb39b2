"""Task kinds: each head type's rules live in its kind, and a sixth head type is one `TaskKind` subclass plus
its registration. The `binary` kind below (one sigmoid logit for a two-label task) is defined here and
nowhere else: once registered, its bundles validate, its tasks are served in mixed batches through the slot
pool (equal to the independent oracle) and over HTTP, and the training helpers build, collate and score its
targets, without any other file knowing of it."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import httpx
import pytest
import torch
import torch.nn.functional as F

from service.api.app import create_app
from service.bundles.codec import decode_bundle, encode_bundle
from service.bundles.manifest import AdapterConfig, HeadConfig, HeadType, Manifest
from service.errors import BundleInvalid
from service.kinds import Targets, kind_names, kind_of, register_kind, unregister_kind
from service.kinds import metrics as M
from service.kinds.examples import Example, TextExample
from service.kinds.heads import SequenceHead
from service.kinds.rows import EncodedRow
from service.kinds.sequence import SequenceKind, text_examples
from service.modeling.encoding import Encoder
from service.runtime.engine import Engine, RowRequest
from service.runtime.runtime import Runtime
from service.settings import ServiceSettings
from service.training.batching import collate_targets
from service.training.features import build_features, infer_labels, serving_inputs
from service.training.scoring import score
from tests.conftest import make_manifest
from tests.oracle.reference import Oracle
from tests.synthetic import random_tensors


class BinaryHead(SequenceHead):
    @classmethod
    def output_width(cls, labels: list[str]) -> int:
        return 1

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits.float().squeeze(-1), targets.float())

    def postprocess(self, logits: torch.Tensor, row: EncodedRow) -> dict[str, Any]:
        p = float(torch.sigmoid(logits.float().reshape(-1)[0]))
        return {"label": self.labels[int(p >= 0.5)], "score": max(p, 1.0 - p)}


class BinaryKind(SequenceKind):
    name: ClassVar[str] = "binary"
    head_class = BinaryHead
    labelled: ClassVar[bool] = False
    metrics: ClassVar[tuple[str, ...]] = ("accuracy",)
    default_metric: ClassVar[str] = "accuracy"

    def label_problem(self, labels: Sequence[str]) -> str | None:
        return None if len(labels) == 2 else "a binary head has exactly 2 labels (the negative one first)"

    def example_from_record(self, text: str, pair: str | None, target: Any, *, label_sep: str, line: int,
                            ) -> Example:
        return TextExample(text, pair, label=str(target), line=line)

    def infer_labels(self, examples: Sequence[Example], order: Sequence[str] | None = None) -> list[str]:
        return list(order) if order else sorted({str(e.label) for e in text_examples(examples)})

    def targets(self, rows: Sequence[EncodedRow], examples: Sequence[Example], labels: Sequence[str]) -> Targets:
        return Targets(list(rows), [float(list(labels).index(str(e.label))) for e in text_examples(examples)])

    def collate(self, targets: Sequence[Any], width: int) -> torch.Tensor:
        return torch.tensor(targets, dtype=torch.float32)

    def score(self, examples: Sequence[Example], predictions: Sequence[dict[str, Any]], labels: Sequence[str],
              extra: Sequence[str] = ()) -> dict[str, float]:
        return {"accuracy": M.accuracy([e.label for e in text_examples(examples)], [p["label"] for p in predictions])}


@pytest.fixture
def binary() -> Iterator[BinaryKind]:
    kind = BinaryKind()
    register_kind(kind)
    try:
        yield kind
    finally:
        unregister_kind(kind.name)


def binary_manifest(ref, task: str = "spam", labels: list[str] | None = None) -> Manifest:
    return Manifest(task=task, head_type="binary", labels=["ham", "spam"] if labels is None else labels,
                    head=HeadConfig(), adapter=AdapterConfig(bottleneck=8), backbone=ref)


# --- the built-in kinds --------------------------------------------------------------------------------


@pytest.mark.parametrize(("head", "question_form", "has_pairs", "refused"), [
    (HeadType.CLASSIFICATION, False, False, None),
    (HeadType.CLASSIFICATION, False, True, None),
    (HeadType.CLASSIFICATION, True, True, "not question answering"),
    (HeadType.MULTILABEL, False, True, None),
    (HeadType.REGRESSION, False, True, None),
    (HeadType.TOKEN_CLASSIFICATION, False, False, None),
    (HeadType.TOKEN_CLASSIFICATION, False, True, "single texts"),
    (HeadType.TOKEN_CLASSIFICATION, True, True, "not question answering"),
    (HeadType.QA, True, True, None),
    (HeadType.QA, False, False, "answers questions"),
    (HeadType.QA, False, True, "answers questions"),
])
def test_each_kind_says_which_request_bodies_fit(head, question_form, has_pairs, refused):
    problem = kind_of(head).input_problem(question_form=question_form, has_pairs=has_pairs)
    assert problem is None if refused is None else refused in problem


@pytest.mark.parametrize(("head", "labels", "width", "problem"), [
    (HeadType.CLASSIFICATION, ["a", "b", "c"], 3, None),
    (HeadType.CLASSIFICATION, ["a"], 1, "at least 2 labels"),
    (HeadType.MULTILABEL, ["a"], 1, None),
    (HeadType.MULTILABEL, [], 0, "at least 1 label"),
    (HeadType.REGRESSION, ["score"], 1, None),
    (HeadType.REGRESSION, ["a", "b"], 1, "one output"),
    (HeadType.TOKEN_CLASSIFICATION, ["O", "B-X", "I-X"], 3, None),
    (HeadType.TOKEN_CLASSIFICATION, ["B-X"], 1, "must include 'O'"),
    (HeadType.TOKEN_CLASSIFICATION, ["O", "X"], 2, "'B-<type>'"),
    (HeadType.QA, [], 2, None),
    (HeadType.QA, ["a"], 2, "no labels"),
])
def test_each_kind_owns_its_output_width_and_label_rules(head, labels, width, problem):
    kind = kind_of(head)
    assert kind.output_size(labels) == width
    got = kind.label_problem(labels)
    assert got is None if problem is None else problem in got


def test_the_registry_knows_the_five_built_in_kinds_and_refuses_others():
    assert kind_names() == [h.value for h in HeadType]
    with pytest.raises(KeyError, match="unknown head type 'binary'"):
        kind_of("binary")
    with pytest.raises(ValueError, match="already registered"):
        register_kind(kind_of(HeadType.QA))
    with pytest.raises(ValueError, match="built-in"):
        unregister_kind("qa")


# --- a sixth kind --------------------------------------------------------------------------------------


def test_a_registered_kind_validates_in_manifests_and_bundles(binary, tiny_backbone):
    manifest = binary_manifest(tiny_backbone.ref)
    assert manifest.kind is binary and manifest.output_size() == 1
    bundle = decode_bundle(encode_bundle(manifest, random_tensors(manifest, seed=0)), backbone=tiny_backbone.ref, max_bytes=2**24)
    assert bundle.manifest.head_type == "binary"
    assert tuple(bundle.tensors["head.out.weight"].shape) == (1, tiny_backbone.ref.hidden_size)
    wrong = binary_manifest(tiny_backbone.ref, labels=["a", "b", "c"])
    with pytest.raises(BundleInvalid, match="exactly 2 labels"):
        decode_bundle(encode_bundle(wrong, random_tensors(wrong, seed=0)), backbone=tiny_backbone.ref, max_bytes=2**24)


def test_an_unregistered_kind_is_refused(tiny_backbone):
    kind = BinaryKind()
    register_kind(kind)
    try:
        manifest = binary_manifest(tiny_backbone.ref)
        data = encode_bundle(manifest, random_tensors(manifest, seed=0))
    finally:
        unregister_kind(kind.name)
    with pytest.raises(BundleInvalid, match="unknown head type 'binary'"):
        decode_bundle(data, backbone=tiny_backbone.ref, max_bytes=2**24)


@pytest.mark.parametrize("packing", ["on", "off"])
def test_a_registered_kind_is_served_in_a_mixed_batch_equal_to_the_oracle(binary, tiny_model_dirs, tiny_backbone,
                                                                           store, packing):
    spam = binary_manifest(tiny_backbone.ref)
    sentiment = make_manifest(tiny_backbone.ref, task="sentiment", head_type=HeadType.CLASSIFICATION)
    tensors = {m.task: random_tensors(m, seed=i) for i, m in enumerate((spam, sentiment))}
    for m in (spam, sentiment):
        store.put(m.task, encode_bundle(m, tensors[m.task]))
    engine = Engine(tiny_backbone, store, cache_max_slots=4, packing=packing)
    texts = ["cheap pills now", "the film was fine", "Hi", "win a prize by replying to this message today"]
    requests = [RowRequest(task, 1, row) for task in ("spam", "sentiment")
                for row in engine.encode(spam if task == "spam" else sentiment, texts)]
    requests = requests[::2] + requests[1::2]  # tasks interleaved in one batch
    results = engine.run(requests, keep_logits=True)
    oracle = Oracle(str(tiny_model_dirs["bert"]))
    for req, res in zip(requests, results):
        manifest = spam if req.task == "spam" else sentiment
        (want,) = oracle.logits(manifest, tensors[req.task], [req.row])
        assert res.error is None and res.logits is not None
        assert torch.allclose(res.logits, want, atol=1e-4), req.task
        assert res.prediction is not None
        if req.task == "spam":
            assert res.logits.shape == (1,) and res.prediction["label"] in ("ham", "spam")
            assert 0.5 <= res.prediction["score"] <= 1.0
        else:
            assert set(res.prediction["scores"]) == {"negative", "positive"}


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.mark.anyio
async def test_a_registered_kind_is_uploaded_and_predicted_over_http(binary, tiny_backbone, store):
    settings = ServiceSettings(admin_token="t", max_wait_ms=2, forward_workers=1)
    app = create_app(Runtime(settings, backbone=tiny_backbone, store=store))
    manifest = binary_manifest(tiny_backbone.ref)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            up = await client.post("/adapters", headers={"Authorization": "Bearer t"}, files={
                "file": ("spam.safetensors", encode_bundle(manifest, random_tensors(manifest, seed=3)))})
            assert up.status_code == 201, up.text
            assert up.json()["head_type"] == "binary"
            got = await client.post("/predict/spam", json={"texts": ["cheap pills", "see you at lunch"]})
            assert got.status_code == 200, got.text
            assert [p["label"] in ("ham", "spam") for p in got.json()["predictions"]] == [True, True]
            refused = await client.post("/predict/spam", json={"question": "q?", "context": "c"})
            assert refused.status_code == 422 and "binary, not question answering" in refused.json()["detail"]


def test_a_registered_kind_trains_and_scores_through_the_training_helpers(binary, tiny_backbone):
    encoder = Encoder(tiny_backbone.tokenizer, 64, tiny_backbone.uses_token_type_ids)
    examples = [TextExample("cheap pills", label="spam"), TextExample("lunch at noon", "ok?", label="ham")]
    with pytest.raises(ValueError, match="second text"):
        serving_inputs("binary", examples)  # the sequence kinds' rule: all rows paired or none
    examples = [TextExample("cheap pills", label="spam"), TextExample("lunch at noon", label="ham")]
    labels = infer_labels("binary", examples)
    assert labels == ["ham", "spam"]
    feats = build_features(encoder, "binary", examples, labels, 64)
    assert feats.targets == [1.0, 0.0] and len(feats.rows) == 2
    assert collate_targets("binary", feats.targets, 9).tolist() == [1.0, 0.0]
    assert score("binary", examples, [{"label": "spam"}, {"label": "spam"}], labels) == {"accuracy": 0.5}
