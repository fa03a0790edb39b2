"""`TaskKind`: everything a head type means, in one object per type (PEFT's per-method tuners, vLLM's
`can_replace_layer` registry are the models).

A kind owns which request bodies its tasks accept (and the messages refusing the others), how their inputs
are tokenised, the head's output width and label rules, the head module itself (with its loss and its
post-processing into the response), and for training: which data formats it reads, the label list, the
targets and their collation, and the metrics. Bundles, the engine, the API schemas, training and scoring
ask the task's kind (`service.kinds.kind_of`) instead of branching on the head type, so adding a head type
is one new module with one `TaskKind` subclass, registered in `service/kinds/__init__.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from service.kinds.examples import Example
from service.kinds.heads import HeadConfig, TaskHead
from service.kinds.rows import EncodedRow

SMOKE_TEXT = "this is a smoke test."


@dataclass
class Targets:
    """Training rows and their targets (one per row), plus how many examples could not be used."""

    rows: list[EncodedRow]
    targets: list[Any]
    dropped: int = 0


class TaskKind:
    """One head type. Subclasses set the class attributes and implement the methods marked so."""

    name: ClassVar[str]
    """The manifest's `head_type` value, e.g. "classification"."""
    head_class: ClassVar[type[TaskHead]]
    sequence_level: ClassVar[bool]
    """One prediction per input row (pooled tokens), as opposed to one per token."""
    labelled: ClassVar[bool] = True
    """The head's output width is its label count (so a bundle whose output layer disagrees with its labels
    is refused as `labels_mismatch`)."""
    question_answering: ClassVar[bool] = False
    """Inputs are (question, context) pairs; only the context is truncated."""
    accepts_pairs: ClassVar[bool] = True
    """Plain-text inputs may carry a second text (sentence-pair tasks)."""
    dataset_formats: ClassVar[tuple[str, ...]] = ("tsv", "csv", "jsonl")
    """Training-data formats this kind reads, the first being what `.json` means for it."""
    metrics: ClassVar[tuple[str, ...]]
    """Metrics `score` reports; `default_metric` picks the best epoch."""
    default_metric: ClassVar[str]
    optional_metrics: ClassVar[tuple[str, ...]] = ()
    """Computed only when asked for (`score(..., extra=)`)."""
    lower_is_better: ClassVar[frozenset[str]] = frozenset()

    # --- requests ----------------------------------------------------------------------------------

    def input_problem(self, *, question_form: bool, has_pairs: bool) -> str | None:
        """Why a request body of this form does not fit the kind (the 422 message), or None."""
        if self.question_answering and not question_form:
            return "this task answers questions: send {question, context} or {questions, contexts}"
        if not self.question_answering and question_form:
            return f"this task is {self.name}, not question answering: send text or texts"
        if has_pairs and not self.accepts_pairs and not question_form:
            return f"this task ({self.name}) takes single texts: text pairs are not accepted"
        return None

    def encode_problem(self, has_pairs: bool) -> str | None:
        """Why inputs with (or without) second texts cannot be encoded for this kind, or None."""
        if self.question_answering and not has_pairs:
            return f"a {self.name} task needs a question and a context for every input"
        if has_pairs and not self.accepts_pairs and not self.question_answering:
            return f"a {self.name} task takes single texts, not text pairs"
        return None

    def smoke_inputs(self) -> tuple[list[str], list[str] | None]:
        """One input an upload's smoke test serves: (texts, second texts or None)."""
        if self.question_answering:
            return ["what is this?"], [SMOKE_TEXT]
        return [SMOKE_TEXT], None

    # --- the head ----------------------------------------------------------------------------------

    def output_size(self, labels: Sequence[str]) -> int:
        """Width of the head's output layer (the head class says)."""
        return self.head_class.output_width(list(labels))

    def label_problem(self, labels: Sequence[str]) -> str | None:
        """Why `labels` do not fit this kind (beyond being unique non-empty strings), or None."""
        return None

    def head_shapes(self, hidden: int, labels: Sequence[str], config: HeadConfig) -> dict[str, tuple[int, ...]]:
        """Bundle tensors of the head (`head.*`) and their shapes."""
        c = self.output_size(labels)
        shapes: dict[str, tuple[int, ...]] = {}
        if self.sequence_level and config.hidden_layer:
            shapes["head.dense.weight"] = (hidden, hidden)
            shapes["head.dense.bias"] = (hidden,)
        shapes["head.out.weight"] = (c, hidden)
        shapes["head.out.bias"] = (c,)
        return shapes

    def build_head(self, hidden: int, labels: Sequence[str], config: HeadConfig) -> TaskHead:
        return self.head_class(hidden, list(labels), config)

    # --- training and scoring ----------------------------------------------------------------------

    def example_from_record(self, text: str, pair: str | None, target: Any, *, label_sep: str, line: int,
                            ) -> Example:
        """A table row (TSV/CSV cells or a JSONL object's fields) -> an example; ValueError says what is
        wrong with `target`. Kinds that read tables implement it."""
        raise NotImplementedError(f"a {self.name} head does not read tables")

    def infer_labels(self, examples: Sequence[Example], order: Sequence[str] | None = None) -> list[str]:
        """The head's label list: `order` when given (a label map's names), else from the examples."""
        return []

    def serving_inputs(self, examples: Sequence[Example]) -> tuple[list[str], list[str] | None]:
        """(texts, second texts or None) exactly as a client would send these examples to the service."""
        raise NotImplementedError

    def targets(self, rows: Sequence[EncodedRow], examples: Sequence[Example], labels: Sequence[str]) -> Targets:
        """Training targets of the encoded `rows` of `examples` (rows a kind cannot train on are dropped)."""
        raise NotImplementedError

    def collate(self, targets: Sequence[Any], width: int) -> torch.Tensor:
        """One batch's targets as the head's `loss` takes them; `width` is the batch's padded length."""
        raise NotImplementedError

    def score(self, examples: Sequence[Example], predictions: Sequence[dict[str, Any]], labels: Sequence[str],
              extra: Sequence[str] = ()) -> dict[str, float]:
        """Metrics of serving `predictions` (one response dict per example) against the gold examples."""
        raise NotImplementedError


def label_index(labels: Sequence[str]) -> dict[str, int]:
    return {name: i for i, name in enumerate(labels)}
