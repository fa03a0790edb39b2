"""Evaluation metrics, written out because each is small and must be exact (tests check them by hand).

Classification: accuracy, macro-F1 (over the labels seen in gold or predictions, as scikit-learn does),
Matthews correlation (multi-class form of Gorodkin 2004). Regression: Pearson and Spearman (ties get
their average rank). NER: entity-level precision/recall/F1 over (type, start, end) spans, with chunks cut
from IOB2 tags as seqeval's default mode does. QA: SQuAD v1.1 exact match and token F1 with the official
answer normalisation. Values are fractions in [0, 1] (correlations in [-1, 1]).
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Hashable, Iterable, Sequence, Sized

import numpy as np

Span = tuple[str, int, int]  # (entity type, first token, last token + 1)


# --- classification ------------------------------------------------------------------------------


def accuracy(gold: Sequence[Hashable], pred: Sequence[Hashable]) -> float:
    _same_length(gold, pred)
    return sum(g == p for g, p in zip(gold, pred)) / len(gold) if gold else 0.0


def _f1(tp: int, fp: int, fn: int) -> float:
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def macro_f1(gold: Sequence[Hashable], pred: Sequence[Hashable]) -> float:
    """Unweighted mean of per-label F1 over every label that occurs in `gold` or `pred`."""
    _same_length(gold, pred)
    labels = set(gold) | set(pred)
    if not labels:
        return 0.0
    scores = []
    for label in labels:
        tp = sum(g == label and p == label for g, p in zip(gold, pred))
        fp = sum(g != label and p == label for g, p in zip(gold, pred))
        fn = sum(g == label and p != label for g, p in zip(gold, pred))
        scores.append(_f1(tp, fp, fn))
    return sum(scores) / len(scores)


def matthews_corrcoef(gold: Sequence[Hashable], pred: Sequence[Hashable]) -> float:
    """(c*s - sum_k p_k t_k) / sqrt((s^2 - sum_k p_k^2)(s^2 - sum_k t_k^2)); 0 when undefined."""
    _same_length(gold, pred)
    s = len(gold)
    c = sum(g == p for g, p in zip(gold, pred))
    t, p = Counter(gold), Counter(pred)
    labels = set(t) | set(p)
    cov_tp = c * s - sum(p[k] * t[k] for k in labels)
    cov_pp = s * s - sum(v * v for v in p.values())
    cov_tt = s * s - sum(v * v for v in t.values())
    denom = math.sqrt(cov_pp * cov_tt)
    return cov_tp / denom if denom else 0.0


def multilabel_scores(gold: Sequence[Iterable[str]], pred: Sequence[Iterable[str]], labels: Sequence[str],
                      ) -> dict[str, float]:
    """Micro-F1, macro-F1 (over `labels`) and subset accuracy (exact set match) for multi-label rows."""
    _same_length(gold, pred)
    gold_sets, pred_sets = [set(g) for g in gold], [set(p) for p in pred]
    total: Counter[str] = Counter()
    per_label = []
    for label in labels:
        tp = sum(label in g and label in p for g, p in zip(gold_sets, pred_sets))
        fp = sum(label not in g and label in p for g, p in zip(gold_sets, pred_sets))
        fn = sum(label in g and label not in p for g, p in zip(gold_sets, pred_sets))
        total.update(tp=tp, fp=fp, fn=fn)
        per_label.append(_f1(tp, fp, fn))
    return {
        "micro_f1": _f1(total["tp"], total["fp"], total["fn"]),
        "macro_f1": sum(per_label) / len(per_label) if per_label else 0.0,
        "subset_accuracy": accuracy([frozenset(g) for g in gold_sets], [frozenset(p) for p in pred_sets]),
    }


# --- regression ----------------------------------------------------------------------------------


def pearson(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    _same_length(x, y)
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    a, b = a - a.mean(), b - b.mean()
    denom = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum()) / denom if denom else 0.0


def average_ranks(x: Sequence[float]) -> np.ndarray:
    """1-based ranks; tied values share the mean of the ranks they span."""
    a = np.asarray(x, dtype=np.float64)
    order = np.argsort(a, kind="mergesort")
    ranks = np.empty(len(a), dtype=np.float64)
    i = 0
    while i < len(a):
        j = i
        while j + 1 < len(a) and a[order[j + 1]] == a[order[i]]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    return pearson(average_ranks(x), average_ranks(y))


# --- token classification ------------------------------------------------------------------------


def bio_spans(tags: Sequence[str]) -> list[Span]:
    """Entity chunks of an IOB2 tag sequence. An I-X that does not continue an X chunk starts one (seqeval's
    default, lenient mode), a B-X always starts one, 'O' ends any."""
    spans: list[Span] = []
    kind, start = None, 0
    for i, tag in enumerate([*tags, "O"]):
        prefix, _, typ = tag.partition("-")
        continues = prefix == "I" and typ == kind
        if kind is not None and not continues:
            spans.append((kind, start, i))
            kind = None
        if prefix in ("B", "I") and not continues:
            kind, start = typ, i
    return spans


def entity_scores(gold: Sequence[Iterable[Span]], pred: Sequence[Iterable[Span]]) -> dict[str, float]:
    """Micro precision/recall/F1 over exact (type, start, end) matches, per sentence; plus F1 per type."""
    _same_length(gold, pred)
    counts: dict[str, Counter[str]] = {}
    for g, p in zip(gold, pred):
        g, p = set(g), set(p)
        for span in g | p:
            c = counts.setdefault(span[0], Counter())
            c["tp" if span in g and span in p else "fn" if span in g else "fp"] += 1
    tp = sum(c["tp"] for c in counts.values())
    fp = sum(c["fp"] for c in counts.values())
    fn = sum(c["fn"] for c in counts.values())
    out = {
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "recall": tp / (tp + fn) if tp + fn else 0.0,
        "f1": _f1(tp, fp, fn),
    }
    for typ in sorted(counts):
        out[f"f1_{typ}"] = _f1(counts[typ]["tp"], counts[typ]["fp"], counts[typ]["fn"])
    return out


# --- extractive QA (official SQuAD v1.1 evaluation) ----------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """Lower case, drop punctuation, drop the articles a/an/the, collapse whitespace (SQuAD v1.1 script)."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def squad_exact(prediction: str, truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(truth))


def squad_f1(prediction: str, truth: str) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(truth).split()
    common = Counter(pred) & Counter(gold)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> dict[str, float]:
    """Mean over questions of the best EM and F1 against any gold answer."""
    _same_length(predictions, answers)
    em = [max(squad_exact(p, a) for a in golds) for p, golds in zip(predictions, answers)]
    f1 = [max(squad_f1(p, a) for a in golds) for p, golds in zip(predictions, answers)]
    n = len(predictions)
    return {"exact_match": sum(em) / n if n else 0.0, "f1": sum(f1) / n if n else 0.0}


def _same_length(a: Sized, b: Sized) -> None:
    if len(a) != len(b):
        raise ValueError(f"gold and predictions differ in length ({len(a)} vs {len(b)})")
