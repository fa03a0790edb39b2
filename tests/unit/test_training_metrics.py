"""Metrics against small tables computed by hand (the arithmetic is in the comments)."""

from __future__ import annotations

import math

import pytest

from service.bundles.manifest import HeadType
from service.kinds import metrics as M
from service.training.readers import QAExample, TextExample, TokenExample
from service.training.scoring import entity_token_spans, is_better, score

GOLD = ["a", "a", "b", "b", "c", "c"]
PRED = ["a", "b", "b", "b", "c", "a"]


def test_accuracy_and_macro_f1_by_hand():
    assert M.accuracy(GOLD, PRED) == pytest.approx(4 / 6)
    # a: tp 1 fp 1 fn 1 -> 2/4; b: tp 2 fp 1 fn 0 -> 4/5; c: tp 1 fp 0 fn 1 -> 2/3
    assert M.macro_f1(GOLD, PRED) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert M.macro_f1(["x", "x"], ["x", "y"]) == pytest.approx((2 / 3 + 0.0) / 2)  # y only predicted


def test_matthews_correlation_by_hand():
    # s=6, c=4, t=(2,2,2), p=(2,3,1): (4*6 - 12) / sqrt((36 - 14) * (36 - 12))
    assert M.matthews_corrcoef(GOLD, PRED) == pytest.approx(12 / math.sqrt(22 * 24))
    # binary: TP 2, FN 1, TN 1, FP 1 -> (2*1 - 1*1) / sqrt(3*3*2*2) = 1/6
    assert M.matthews_corrcoef([1, 1, 1, 0, 0], [1, 1, 0, 0, 1]) == pytest.approx(1 / 6)
    assert M.matthews_corrcoef([1, 1, 0], [1, 1, 1]) == 0.0  # one predicted class: undefined -> 0


def test_against_scikit_learn_when_installed():
    sk = pytest.importorskip("sklearn.metrics")
    assert M.macro_f1(GOLD, PRED) == pytest.approx(sk.f1_score(GOLD, PRED, average="macro"))
    assert M.matthews_corrcoef(GOLD, PRED) == pytest.approx(sk.matthews_corrcoef(GOLD, PRED))


def test_pearson_and_spearman_by_hand():
    x, y = [1, 2, 3, 4, 5], [2, 4, 5, 4, 5]
    # dx = -2..2, dy = (-2, 0, 1, 0, 1): 6 / sqrt(10 * 6)
    assert M.pearson(x, y) == pytest.approx(6 / math.sqrt(60))
    # ranks of y with ties averaged: (1, 2.5, 4.5, 2.5, 4.5): 7 / sqrt(10 * 9)
    assert list(M.average_ranks(y)) == [1, 2.5, 4.5, 2.5, 4.5]
    assert M.spearman(x, y) == pytest.approx(7 / math.sqrt(90))
    assert M.pearson([1, 1, 1], [1, 2, 3]) == 0.0  # constant input: undefined -> 0


def test_bio_spans_lenient_like_seqeval():
    tags = ["B-PER", "I-PER", "O", "I-LOC", "B-LOC", "I-ORG", "I-ORG"]
    assert M.bio_spans(tags) == [("PER", 0, 2), ("LOC", 3, 4), ("LOC", 4, 5), ("ORG", 5, 7)]
    assert M.bio_spans(["O", "O"]) == []
    assert M.bio_spans(["B-MISC"]) == [("MISC", 0, 1)]


def test_entity_scores_by_hand():
    gold = [[("PER", 0, 2), ("LOC", 3, 4)], [("ORG", 0, 1)]]
    pred = [[("PER", 0, 2), ("LOC", 3, 5)], []]
    out = M.entity_scores(gold, pred)  # tp 1, fp 1, fn 2
    assert out["precision"] == pytest.approx(0.5) and out["recall"] == pytest.approx(1 / 3)
    assert out["f1"] == pytest.approx(2 / 5)
    assert (out["f1_PER"], out["f1_LOC"], out["f1_ORG"]) == (1.0, 0.0, 0.0)


def test_squad_normalisation_exact_match_and_f1():
    assert M.normalize_answer("The  Quick, brown fox!") == "quick brown fox"
    assert M.squad_exact("Denver Broncos", "the Denver Broncos.") == 1.0
    # pred (cat, sat) vs gold (cat, sat, down): P 1, R 2/3 -> F1 0.8
    assert M.squad_f1("the cat sat", "a cat sat down") == pytest.approx(0.8)
    assert M.squad_f1("", "anything") == 0.0
    out = M.squad_scores(["cat sat", "dog"], [["a cat sat down", "cat sat"], ["bird"]])
    assert out == {"exact_match": pytest.approx(0.5), "f1": pytest.approx(0.5)}


def test_score_from_serving_predictions():
    ex = [TextExample("t", label="pos"), TextExample("u", label="neg")]
    got = score(HeadType.CLASSIFICATION, ex, [{"label": "pos"}, {"label": "pos"}], extra=("mcc",))
    assert got == {"accuracy": 0.5, "macro_f1": pytest.approx((2 / 3) / 2), "mcc": 0.0}
    reg = score(HeadType.REGRESSION, [TextExample("a", score=1.0), TextExample("b", score=3.0)],
                [{"value": 1.5}, {"value": 2.0}])
    assert reg["mse"] == pytest.approx((0.25 + 1.0) / 2) and reg["pearson"] == pytest.approx(1.0)
    multi = score(HeadType.MULTILABEL, [TextExample("a", labels=("x", "y")), TextExample("b", labels=())],
                  [{"labels": ["x"]}, {"labels": ["y"]}], labels=["x", "y"])
    # x: tp 1; y: fp 1, fn 1 -> micro 2/(2+1+1); macro (1 + 0) / 2; no row exactly right
    assert multi == {"micro_f1": 0.5, "macro_f1": 0.5, "subset_accuracy": 0.0}
    qa = QAExample("1", "t", "q?", "the context", (("context", 4),))
    assert score(HeadType.QA, [qa], [{"answer": "the context"}]) == {"exact_match": 1.0, "f1": 1.0}


def test_entities_in_characters_map_to_conll_words():
    words = ("U.S.", "officials", "met", "Kuechly")  # starts 0, 5, 15, 19
    ents = [{"entity": "LOC", "start": 0, "end": 4}, {"entity": "PER", "start": 19, "end": 26},
            {"entity": "ORG", "start": 2, "end": 4}]  # an entity starting inside a word counts for that word
    assert entity_token_spans(words, ents) == [("LOC", 0, 1), ("PER", 3, 4), ("ORG", 0, 1)]
    ex = TokenExample(words, ("B-LOC", "O", "O", "B-PER"))
    got = score(HeadType.TOKEN_CLASSIFICATION, [ex], [{"entities": ents[:2]}])
    assert got["f1"] == 1.0


def test_is_better_knows_lower_is_better():
    assert is_better("accuracy", 0.8, 0.7) and not is_better("accuracy", 0.7, 0.7)
    assert is_better("mse", 0.1, 0.2) and is_better("f1", 0.0, None)
