"""Examples -> what the model sees: label maps, label sets, serving inputs, and tokenised rows with targets.

Training rows are tokenised by the serving `Encoder` with the serving call (`encode(texts, pairs,
max_length=, qa=)`), so the model trains on exactly the token sequences the engine will feed it. What each
head type makes of its examples (labels, inputs, targets) is its kind's (`service/kinds/`); token
classification's alignment of CoNLL words to sub-tokens is explained in `service/kinds/token_classification.py`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

from service.kinds import Targets, kind_of
from service.kinds.examples import Example, TextExample
from service.modeling.encoding import EncodedRow, Encoder

Features = Targets
"""Tokenised rows and their targets (one per row), plus how many examples could not be used."""


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


def infer_labels(head: str, examples: Sequence[Example], order: Sequence[str] | None = None) -> list[str]:
    """The head's label list: `order` when given (a label map's names), else from the examples (numbers
    sorted numerically; token classification: 'O', then B-X and I-X per entity type)."""
    return kind_of(head).infer_labels(examples, order)


# --- serving inputs ------------------------------------------------------------------------------


def serving_inputs(head: str, examples: Sequence[Example]) -> tuple[list[str], list[str] | None]:
    """(texts, pairs) exactly as a client would send them to the service for these examples."""
    return kind_of(head).serving_inputs(examples)


def encode_inputs(encoder: Encoder, head: str, examples: Sequence[Example], max_length: int) -> list[EncodedRow]:
    """Serving-identical tokenisation of the examples' inputs."""
    texts, pairs = serving_inputs(head, examples)
    return encoder.encode(texts, pairs, max_length=max_length, qa=kind_of(head).question_answering)


# --- training targets ----------------------------------------------------------------------------


def build_features(encoder: Encoder, head: str, examples: Sequence[Example], labels: Sequence[str],
                   max_length: int) -> Features:
    """Rows + targets for training (QA examples whose answer was cut off by truncation are dropped)."""
    return kind_of(head).targets(encode_inputs(encoder, head, examples, max_length), examples, labels)
