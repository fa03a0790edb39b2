"""Reading a data file the way a task was trained: reader options, label map, and the QA article split.

`train` records its reader options in the bundle's manifest (`training.reader`); `evaluate` and the
re-score tests reuse them, so scoring a bundle needs only the eval file.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from service.bundles.manifest import Manifest
from service.kinds.qa import qa_examples
from service.training.features import apply_label_map, parse_label_map
from service.training.readers import (
    Example,
    TableColumns,
    read_dataset,
    split_by_article,
    split_holdout,
)

READER_DEFAULTS: dict[str, Any] = {
    "format": "auto", "text_column": None, "pair_column": None, "label_column": None, "header": True,
    "label_sep": ",", "label_map": None, "eval_articles": None, "split_seed": 0,
}


def sha256_file(path: Path | str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def reader_options(**given: Any) -> dict[str, Any]:
    """READER_DEFAULTS overridden by every option that is not None."""
    unknown = set(given) - set(READER_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown reader options {sorted(unknown)}")
    return {k: (given[k] if given.get(k) is not None else v) for k, v in READER_DEFAULTS.items()}


def load_examples(path: Path | str, head: str, opts: dict[str, Any]) -> list[Example]:
    """Examples of `path` read with `opts` (see READER_DEFAULTS), label map applied."""
    columns = TableColumns(opts["text_column"], opts["pair_column"], opts["label_column"], opts["header"],
                           opts["label_sep"])
    examples = read_dataset(path, head, columns, opts["format"])
    return apply_label_map(examples, parse_label_map(opts["label_map"]))


def examples_for_bundle(manifest: Manifest, path: Path | str, **given: Any) -> Sequence[Example]:
    """The eval examples of `path` for a trained bundle: its recorded reader options, overridden by `given`
    (None = not given). A qa bundle trained with `--eval-articles` on this very file gets the same held-out
    articles, and a bundle trained with `--holdout` the same held-out rows, when `path` is its training file
    (scoring it on the whole file would score its training examples)."""
    recorded = dict(manifest.training.get("reader") or {})
    opts = reader_options(**{**{k: v for k, v in recorded.items() if k in READER_DEFAULTS},
                             **{k: v for k, v in given.items() if v is not None}})
    examples: Sequence[Example] = load_examples(path, manifest.head_type, opts)
    same_file = sha256_file(path) == manifest.training.get("train_sha256")
    holdout = manifest.training.get("holdout")
    if holdout and same_file:  # trained with --holdout: its eval split is that slice of the training file
        return split_holdout(examples, int(holdout["examples"]), int(holdout["seed"]))[1]
    if opts["eval_articles"] and (same_file or given.get("eval_articles") is not None):
        examples = split_by_article(qa_examples(examples), opts["eval_articles"], opts["split_seed"])[1]
    return examples
