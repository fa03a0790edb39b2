"""Head post-processing into user-facing predictions, on hand-made logits."""

from __future__ import annotations

import pytest
import torch

from service.bundles.manifest import BackboneRef, HeadConfig, HeadType
from service.kinds.classification import ClassificationHead
from service.kinds.multilabel import MultiLabelHead
from service.kinds.qa import QuestionAnsweringHead
from service.kinds.regression import RegressionHead
from service.kinds.token_classification import TokenClassificationHead
from service.modeling.encoding import EncodedRow
from service.modeling.heads import build_head, head_tensors
from tests.conftest import LABELS, make_manifest

REF = BackboneRef(id="t", fingerprint="0" * 64, model_type="bert", hidden_size=8, num_layers=1)
TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]


def row(text: str, words: list[tuple[int, int]], pair: str | None = None, seq=None) -> EncodedRow:
    """One token per word span, plus [CLS]/[SEP] around."""
    offsets = ((0, 0), *words, (0, 0))
    word_ids = (None, *range(len(words)), None)
    sequence_ids = seq or (None, *([0] * len(words)), None)
    return EncodedRow(tuple(range(len(offsets))), None, offsets, sequence_ids, word_ids, False, text, pair)


def one_hot(tags: list[str], p: float = 0.9) -> torch.Tensor:
    """Token logits whose softmax gives probability ~p to each tag (with [CLS]/[SEP] rows as 'O')."""
    rows = []
    for tag in ["O", *tags, "O"]:
        logits = torch.full((len(TAGS),), 0.0)
        logits[TAGS.index(tag)] = torch.log(torch.tensor(p * (len(TAGS) - 1) / (1 - p)))
        rows.append(logits)
    return torch.stack(rows)


def test_classification_gives_label_score_and_all_scores():
    head = ClassificationHead(8, ["neg", "pos"], HeadConfig())
    out = head.postprocess(torch.tensor([0.0, 2.0]), None)
    assert out["label"] == "pos"
    assert out["score"] == pytest.approx(torch.softmax(torch.tensor([0.0, 2.0]), 0)[1].item())
    assert out["scores"]["neg"] + out["scores"]["pos"] == pytest.approx(1.0)


def test_multilabel_applies_the_threshold():
    head = MultiLabelHead(8, ["a", "b", "c"], HeadConfig(threshold=0.6))
    out = head.postprocess(torch.tensor([2.0, 0.0, 0.5]), None)  # sigmoid: .88, .5, .62
    assert out["labels"] == ["a", "c"]
    assert out["scores"]["b"] == pytest.approx(0.5)


def test_regression_gives_a_value():
    assert RegressionHead(8, ["score"], HeadConfig()).postprocess(torch.tensor([3.7]), None) == {
        "value": pytest.approx(3.7)
    }


TEXT = "John Smith met Anna in New York"
WORDS = [(0, 4), (5, 10), (11, 14), (15, 19), (20, 22), (23, 26), (27, 31)]


@pytest.mark.parametrize(
    "tags, expected",
    [
        (["B-PER", "I-PER", "O", "B-PER", "O", "B-LOC", "I-LOC"],
         [("PER", "John Smith", 0, 10), ("PER", "Anna", 15, 19), ("LOC", "New York", 23, 31)]),
        (["O"] * 7, []),
        # an I- tag without its B- still starts an entity (lenient, like HF's "simple" grouping)
        (["I-PER", "I-PER", "O", "O", "O", "O", "B-LOC"], [("PER", "John Smith", 0, 10), ("LOC", "York", 27, 31)]),
        # a type change inside a run splits the entity
        (["B-PER", "I-LOC", "O", "O", "O", "O", "O"], [("PER", "John", 0, 4), ("LOC", "Smith", 5, 10)]),
        # B- after B- of the same type: two entities
        (["B-PER", "B-PER", "O", "O", "O", "O", "O"], [("PER", "John", 0, 4), ("PER", "Smith", 5, 10)]),
    ],
)
def test_token_classification_groups_bio_tags_into_entities(tags, expected):
    head = TokenClassificationHead(8, TAGS, HeadConfig())
    out = head.postprocess(one_hot(tags), row(TEXT, WORDS))
    got = [(e["entity"], e["text"], e["start"], e["end"]) for e in out["entities"]]
    assert got == expected
    for e in out["entities"]:
        assert TEXT[e["start"] : e["end"]] == e["text"]
        assert e["score"] == pytest.approx(0.9, abs=1e-4)


def test_token_classification_uses_the_first_subtoken_of_each_word():
    # "Smithson" split into two tokens of one word: the word takes the first token's tag, the span covers both
    text = "Smithson"
    r = EncodedRow((0, 1, 2, 3), None, ((0, 0), (0, 5), (5, 8), (0, 0)), (None, 0, 0, None), (None, 0, 0, None),
                   False, text)
    head = TokenClassificationHead(8, TAGS, HeadConfig())
    out = head.postprocess(one_hot(["B-PER", "O"]), r)
    assert [(e["text"], e["start"], e["end"]) for e in out["entities"]] == [("Smithson", 0, 8)]


def test_qa_picks_the_best_span_inside_the_context():
    question, context = "Who?", "Anna lives in Paris"
    ctx_words = [(0, 4), (5, 10), (11, 13), (14, 19)]
    offsets = ((0, 0), (0, 4), (0, 0), *ctx_words, (0, 0))
    seq = (None, 0, None, 1, 1, 1, 1, None)
    r = EncodedRow(tuple(range(8)), None, offsets, seq, (None, 0, None, 0, 1, 2, 3, None), False, question, context)
    logits = torch.zeros(8, 2)
    logits[1] = torch.tensor([9.0, 9.0])  # the question token scores highest but is not in the context
    logits[5, 0] = 4.0  # start at "in"
    logits[6, 1] = 4.0  # end at "Paris"
    head = QuestionAnsweringHead(8, [], HeadConfig(max_answer_tokens=30))
    out = head.postprocess(logits, r)
    assert out["answer"] == "in Paris" and (out["start"], out["end"]) == (11, 19)
    assert context[out["start"] : out["end"]] == out["answer"]
    assert 0 < out["score"] <= 1


def test_qa_respects_span_order_and_maximum_length():
    context = "a b c d"
    words = [(0, 1), (2, 3), (4, 5), (6, 7)]
    offsets = ((0, 0), (0, 0), *words, (0, 0))
    seq = (None, None, 1, 1, 1, 1, None)
    r = EncodedRow(tuple(range(7)), None, offsets, seq, (None,) * 7, False, "q", context)
    logits = torch.zeros(7, 2)
    logits[5, 0], logits[2, 1] = 5.0, 4.0  # best start ("d") after best end ("a"): not a valid span
    logits[3, 0], logits[4, 1] = 1.0, 1.0
    out = QuestionAnsweringHead(8, [], HeadConfig(max_answer_tokens=2)).postprocess(logits, r)
    assert (out["start"], out["end"]) == (6, 7)  # start "d", end "d": best valid span of length <= 2
    out = QuestionAnsweringHead(8, [], HeadConfig(max_answer_tokens=1)).postprocess(logits, r)
    assert out["end"] - out["start"] == 1


@pytest.mark.parametrize("head_type", list(HeadType))
def test_build_head_round_trips_bundle_tensors(head_type):
    manifest = make_manifest(REF, head_type=head_type)
    head = build_head(manifest)
    again = build_head(manifest, head_tensors(head))
    for (k, a), (_, b) in zip(head.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    assert len(head.labels) == len(LABELS[head_type])
