"""Training features: label lists, sub-token tag alignment, answer spans, length-grouped batches."""

from __future__ import annotations

import random

import pytest

from service.bundles.manifest import HeadType
from service.kinds.heads import IGNORE_INDEX
from service.modeling.encoding import Encoder
from service.settings import DEFAULT_BACKBONE
from service.training.batching import collate_targets, grouped_batches, sorted_batches
from service.training.features import (
    apply_label_map,
    build_features,
    infer_labels,
    parse_label_map,
    serving_inputs,
)
from service.training.readers import QAExample, TextExample, TokenExample


@pytest.fixture(scope="module")
def encoder():
    from transformers import AutoTokenizer

    from service.modeling.backbone import resolve_backbone_path

    return Encoder(AutoTokenizer.from_pretrained(resolve_backbone_path(DEFAULT_BACKBONE)), 128, True)


def test_label_lists_by_head():
    ex = [TextExample("a", label="10"), TextExample("b", label="9"), TextExample("c", label="neg")]
    assert infer_labels(HeadType.CLASSIFICATION, ex) == ["9", "10", "neg"]  # numbers numerically first
    tok = [TokenExample(("x", "y"), ("B-PER", "O")), TokenExample(("z",), ("I-LOC",))]
    assert infer_labels(HeadType.TOKEN_CLASSIFICATION, tok) == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    assert infer_labels(HeadType.REGRESSION, [TextExample("a", score=1.0)]) == []


def test_label_map_renames_and_orders():
    mapping = parse_label_map("1=positive, 0=negative")
    assert list(mapping.items()) == [("1", "positive"), ("0", "negative")]
    ex = apply_label_map([TextExample("a", label="0"), TextExample("b", label="1")], mapping)
    assert [e.label for e in ex] == ["negative", "positive"]
    assert infer_labels(HeadType.CLASSIFICATION, ex, list(mapping.values())) == ["positive", "negative"]
    with pytest.raises(ValueError, match="not in the label map"):
        apply_label_map([TextExample("a", label="2", line=7)], mapping)
    with pytest.raises(ValueError, match="RAW=NAME"):
        parse_label_map("0:negative")


def test_serving_inputs_per_head():
    assert serving_inputs(HeadType.CLASSIFICATION, [TextExample("a", "b", label="x")]) == (["a"], ["b"])
    assert serving_inputs(HeadType.REGRESSION, [TextExample("a", score=1.0)]) == (["a"], None)
    assert serving_inputs(HeadType.TOKEN_CLASSIFICATION, [TokenExample(("U.S.", "won"), ("B-LOC", "O"))]) == (
        ["U.S. won"], None)
    assert serving_inputs(HeadType.QA, [QAExample("1", "t", "q?", "ctx", (("ctx", 0),))]) == (["q?"], ["ctx"])


def test_token_targets_follow_the_serving_word_split(encoder):
    ex = TokenExample(("U.S.", "officials", "met", "Kuechly"), ("B-LOC", "O", "O", "B-PER"))
    labels = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    feats = build_features(encoder, HeadType.TOKEN_CLASSIFICATION, [ex], labels, 64)
    row, target = feats.rows[0], feats.targets[0]
    tokens = encoder.tokenizer.convert_ids_to_tokens(row.input_ids)
    tagged = [(tok, labels[t] if t != IGNORE_INDEX else None) for tok, t in zip(tokens, target)]
    # "U.S." is four tokenizer words (u . s .): the first gets B-LOC, the others continue the entity;
    # "kuechly" is one word of several sub-tokens: only its first is trained
    assert tagged[:6] == [("[CLS]", None), ("u", "B-LOC"), (".", "I-LOC"), ("s", "I-LOC"), (".", "I-LOC"),
                          ("officials", "O")]
    kuechly = [t for tok, t in tagged[7:-1]]
    assert len(kuechly) > 1 and kuechly[0] == "B-PER" and set(kuechly[1:]) == {None}
    assert tagged[-1] == ("[SEP]", None)


def test_answer_tokens_and_truncated_answers_are_dropped(encoder):
    context = "The game was played in Santa Clara. " + "Filler words go here. " * 30 + "The end came at dusk."
    near = QAExample("1", "t", "Where was it played?", context, (("Santa Clara", context.index("Santa")),))
    far = QAExample("2", "t", "When did it end?", context, (("dusk", context.index("dusk")),))
    feats = build_features(encoder, HeadType.QA, [near, far], [], 64)
    assert feats.dropped == 1 and len(feats.rows) == 1
    row, (s, e) = feats.rows[0], feats.targets[0]
    assert context[row.offsets[s][0] : row.offsets[e][1]] == "Santa Clara"


def test_classification_targets_and_unknown_labels(encoder):
    ex = [TextExample("good", label="pos"), TextExample("bad", label="neg")]
    assert build_features(encoder, HeadType.CLASSIFICATION, ex, ["neg", "pos"], 16).targets == [1, 0]
    with pytest.raises(ValueError, match="not in the label list"):
        build_features(encoder, HeadType.CLASSIFICATION, ex, ["pos", "other"], 16)


def test_grouped_batches_cover_every_example_once_with_little_padding():
    rng = random.Random(3)
    lengths = [rng.randint(5, 60) for _ in range(1000)]
    batches = grouped_batches(lengths, 32, random.Random(1))
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(1000)) and len(batches) == 32
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    assert padded / sum(lengths) < 1.1  # plain random batches pad ~1.9x here
    assert grouped_batches(lengths, 32, random.Random(1)) == batches  # seeded
    assert [len(b) for b in sorted_batches(lengths, 100)] == [100] * 10


def test_collate_targets_pads_token_targets():
    got = collate_targets(HeadType.TOKEN_CLASSIFICATION, [[IGNORE_INDEX, 1], [IGNORE_INDEX, 2, 0]], 4)
    assert got.tolist() == [[IGNORE_INDEX, 1, IGNORE_INDEX, IGNORE_INDEX], [IGNORE_INDEX, 2, 0, IGNORE_INDEX]]
    assert collate_targets(HeadType.QA, [(3, 5)], 9).tolist() == [[3, 5]]
