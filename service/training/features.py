"""Examples -> what the model sees: label sets, serving inputs, and tokenised rows with training targets.

Training rows are tokenised by the serving `Encoder` with the serving call (`encode(texts, pairs,
max_length=, qa=)`), so the model trains on exactly the token sequences the engine will feed it.

Token classification: a CoNLL sentence is sent as its words joined by single spaces. The serving head tags
each *tokenizer* word by its first sub-token, and the tokenizer may split one CoNLL word into several
(e.g. "U.S." -> "U", ".", "S", "."). So the first sub-token of every tokenizer word is trained: with the
CoNLL tag for the first piece of a word, and its continuation (B-X/I-X -> I-X, O -> O) for later pieces;
other sub-tokens and special tokens are ignored (IGNORE_INDEX).
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, cast

from service.bundles.manifest import HeadType
from service.modeling.encoding import EncodedRow, Encoder
from service.modeling.heads import IGNORE_INDEX
from service.training.readers import (
    Example,
    QAExample,
    TextExample,
    TokenExample,
    classification_examples,
    multilabel_examples,
    qa_examples,
    regression_examples,
    text_examples,
    token_examples,
)


@dataclass
class Features:
    """Tokenised rows and their targets (one per row), plus how many examples could not be used."""

    rows: list[EncodedRow]
    targets: list[Any]  # per head: class index, multi-hot vector, score, token class indices, answer span
    dropped: int = 0


# --- labels --------------------------------------------------------------------------------------


def parse_label_map(spec: str | None) -> dict[str, str] | None:
    """'0=negative,1=positive' -> {'0': 'negative', '1': 'positive'} (order kept: it is the label order)."""
    if not spec:
        return None
    out: dict[str, str] = {}
    for part in spec.split(","):
        raw, sep, name = part.partition("=")
        if not sep or not raw.strip() or not name.strip():
            raise ValueError(f"label map entry {part!r} is not RAW=NAME")
        out[raw.strip()] = name.strip()
    return out


def apply_label_map(examples: list[Example], mapping: Mapping[str, str] | None) -> list[Example]:
    """Rename classification/multilabel targets through `mapping`; an unmapped label is an error."""
    if not mapping:
        return examples

    def rename(label: str, ex: TextExample) -> str:
        if label not in mapping:
            raise ValueError(f"line {ex.line}: label {label!r} is not in the label map {list(mapping)}")
        return mapping[label]

    out: list[Example] = []
    for ex in examples:
        if isinstance(ex, TextExample) and ex.label is not None:
            ex = replace(ex, label=rename(ex.label, ex))
        elif isinstance(ex, TextExample) and ex.labels is not None:
            ex = replace(ex, labels=tuple(rename(x, ex) for x in ex.labels))
        out.append(ex)
    return out


def _natural_key(label: str) -> tuple[int, float, str]:
    return (0, float(label), label) if re.fullmatch(r"-?\d+(\.\d+)?", label) else (1, 0.0, label)


def infer_labels(head: HeadType, examples: Sequence[Example], order: Sequence[str] | None = None) -> list[str]:
    """The head's label list: `order` when given (a label map's names), else sorted (numbers numerically).
    Token classification: 'O', then B-X and I-X for every entity type X (sorted)."""
    if head in (HeadType.REGRESSION, HeadType.QA):
        return []
    if head is HeadType.TOKEN_CLASSIFICATION:
        types = sorted({t[2:] for ex in token_examples(examples) for t in ex.tags if t != "O"})
        return ["O"] + [f"{p}-{t}" for t in types for p in ("B", "I")]
    seen: set[str] = set()
    if head is HeadType.MULTILABEL:
        for multi in multilabel_examples(examples):
            seen.update(multi.labels)
    else:
        for single in classification_examples(examples):
            seen.update([single.label])
    if order:
        return list(dict.fromkeys(order))
    return sorted(seen, key=_natural_key)


# --- serving inputs ------------------------------------------------------------------------------


def serving_inputs(head: HeadType, examples: Sequence[Example]) -> tuple[list[str], list[str] | None]:
    """(texts, pairs) exactly as a client would send them to the service for these examples."""
    if head is HeadType.QA:
        questions = qa_examples(examples)
        return [e.question for e in questions], [e.context for e in questions]
    if head is HeadType.TOKEN_CLASSIFICATION:
        return [e.text for e in token_examples(examples)], None
    pairs = [e.pair for e in text_examples(examples)]
    has_pairs = any(p is not None for p in pairs)
    if has_pairs and any(p is None for p in pairs):
        raise ValueError("some rows have a second text and some do not")
    # cast: with has_pairs, every row has its second text (checked just above)
    return [e.text for e in text_examples(examples)], cast("list[str]", pairs) if has_pairs else None


def encode_inputs(encoder: Encoder, head: HeadType, examples: Sequence[Example], max_length: int,
                  ) -> list[EncodedRow]:
    """Serving-identical tokenisation of the examples' inputs."""
    texts, pairs = serving_inputs(head, examples)
    return encoder.encode(texts, pairs, max_length=max_length, qa=head is HeadType.QA)


# --- training targets ----------------------------------------------------------------------------


def build_features(encoder: Encoder, head: HeadType, examples: Sequence[Example], labels: Sequence[str],
                   max_length: int) -> Features:
    """Rows + targets for training. QA examples whose answer was cut off by truncation are dropped."""
    rows = encode_inputs(encoder, head, examples, max_length)
    index = {name: i for i, name in enumerate(labels)}
    if head is HeadType.CLASSIFICATION:
        missing = sorted({e.label for e in classification_examples(examples)} - set(index))
        if missing:
            raise ValueError(f"labels {missing[:5]} are not in the label list {list(labels)}")
        return Features(rows, [index[e.label] for e in classification_examples(examples)])
    if head is HeadType.MULTILABEL:
        targets = []
        for multi in multilabel_examples(examples):
            vec = [0.0] * len(labels)
            for name in multi.labels:
                if name not in index:
                    raise ValueError(f"label {name!r} is not in the label list {list(labels)}")
                vec[index[name]] = 1.0
            targets.append(vec)
        return Features(rows, targets)
    if head is HeadType.REGRESSION:
        return Features(rows, [float(e.score) for e in regression_examples(examples)])
    if head is HeadType.TOKEN_CLASSIFICATION:
        return Features(rows, [token_targets(r, e, index) for r, e in zip(rows, token_examples(examples))])
    kept_rows: list[EncodedRow] = []
    spans: list[tuple[int, int]] = []
    for r, qa in zip(rows, qa_examples(examples)):
        span = answer_tokens(r, qa)
        if span is not None:
            kept_rows.append(r)
            spans.append(span)
    return Features(kept_rows, spans, dropped=len(rows) - len(kept_rows))


def word_starts(tokens: Sequence[str]) -> list[int]:
    """Character offset of each word in `" ".join(tokens)`."""
    starts, pos = [], 0
    for tok in tokens:
        starts.append(pos)
        pos += len(tok) + 1
    return starts


def continuation(tag: str) -> str:
    """The tag of a later piece of a word tagged `tag`: inside the same entity, or outside."""
    return "O" if tag == "O" else f"I-{tag[2:]}"


def token_targets(row: EncodedRow, example: TokenExample, index: Mapping[str, int]) -> list[int]:
    """Per sub-token class index (IGNORE_INDEX where the serving head does not read a tag)."""
    starts = word_starts(example.tokens)
    out = [IGNORE_INDEX] * len(row)
    for t, w in enumerate(row.word_ids):
        if w is None or row.sequence_ids[t] != 0 or (t > 0 and row.word_ids[t - 1] == w):
            continue
        char = row.offsets[t][0]
        k = bisect.bisect_right(starts, char) - 1
        tag = example.tags[k] if char == starts[k] else continuation(example.tags[k])
        if tag not in index:
            raise ValueError(f"tag {tag!r} (line {example.line}) is not in the label list {list(index)}")
        out[t] = index[tag]
    return out


def answer_tokens(row: EncodedRow, example: QAExample) -> tuple[int, int] | None:
    """(start, end) token indices of the first gold answer inside the context window, or None if cut off."""
    text, start = example.answers[0]
    end = start + len(text)
    ctx = [t for t, s in enumerate(row.sequence_ids) if s == 1]
    if not ctx or row.offsets[ctx[-1]][1] < end:
        return None
    first = next((t for t in ctx if row.offsets[t][1] > start), None)
    last = next((t for t in reversed(ctx) if row.offsets[t][0] < end), None)
    if first is None or last is None or last < first:
        return None
    return first, last
