"""Dataset readers: TSV / CSV / JSONL tables, CoNLL token files and SQuAD JSON -> typed examples.

Every problem in a file is a `DatasetError` naming the file and the line (or, for SQuAD, the JSON path),
so a user can open the file at the right place. TSV is split on tabs with no quote handling, which is
how the GLUE files must be read (they contain unbalanced `"`); CSV uses the csv module's quoting.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypedDict, overload

from service.errors import ServiceError
from service.kinds import kind_of
from service.kinds.examples import Example, QAExample, TextExample, TokenExample

__all__ = ["DatasetError", "Example", "QAExample", "TableColumns", "TextExample", "TokenExample", "read_conll",
           "read_dataset", "read_squad", "read_table", "split_by_article", "split_holdout"]

TEXT_COLUMNS = ("text", "sentence", "sentence1", "question", "#1 String", "premise")
PAIR_COLUMNS = ("text_pair", "sentence2", "#2 String", "hypothesis")
LABEL_COLUMNS = ("label", "labels", "score", "Quality")


class DatasetError(ServiceError):
    """A data file that cannot be read as asked; the message starts with `file:line:`."""

    def __init__(self, path: Path | str, line: int | str | None, message: str):
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {message}")
        self.path = str(path)
        self.line = line


@dataclass(frozen=True)
class TableColumns:
    """Which columns of a table hold what: names, or 0-based indices for files without a header."""

    text: str | None = None
    pair: str | None = None
    label: str | None = None
    header: bool = True
    label_sep: str = ","  # multilabel: separator inside the label cell (JSONL may also give a list)

    def as_dict(self) -> dict[str, Any]:
        return {"text": self.text, "pair": self.pair, "label": self.label, "header": self.header,
                "label_sep": self.label_sep}


FORMATS = ("auto", "tsv", "csv", "jsonl", "conll", "squad")


def detect_format(path: Path, head: str) -> str:
    """The reader a file needs, from its suffix (and the head's kind for `.json`/`.txt`)."""
    formats = kind_of(head).dataset_formats
    suffix = path.suffix.lower()
    if suffix in (".tsv", ".tab"):
        return "tsv"
    if suffix == ".csv":
        return "csv"
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix == ".json":
        return "squad" if "squad" in formats else "jsonl"
    if suffix in (".conll", ".txt", ".bio", ".iob") or "conll" in formats:
        return "conll"
    raise DatasetError(path, None, f"cannot tell the format from the suffix '{suffix}'; pass --format")


FORMAT_NAMES = {"squad": "SQuAD JSON", "conll": "CoNLL files", "tsv": "TSV", "csv": "CSV", "jsonl": "JSONL"}


def read_dataset(
    path: Path | str, head: str, columns: TableColumns | None = None, fmt: str = "auto",
) -> list[Example]:
    """Read `path` into examples for `head` (the reader follows the format; the head's kind says which
    formats it reads and makes each table row's target)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(path, None, "no such file")
    kind = kind_of(head)
    fmt = detect_format(path, head) if fmt == "auto" else fmt
    if fmt not in kind.dataset_formats:
        names = [FORMAT_NAMES[f] for f in kind.dataset_formats]
        readable = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
        raise DatasetError(path, None, f"a {kind.name} head reads {readable}, not {fmt}")
    if fmt == "squad":
        return list(read_squad(path))
    if fmt == "conll":
        return list(read_conll(path))
    examples: list[Example] = list(read_table(path, head, columns or TableColumns(), fmt))
    if not examples:
        raise DatasetError(path, None, "no examples in file")
    return examples


# --- tables --------------------------------------------------------------------------------------


def _records(path: Path, fmt: str, header: bool,
             ) -> Iterator[tuple[int, list[str] | dict[str, Any], list[str] | None]]:
    """(line number, cells or JSON object, header names) per data line; blank lines are skipped."""
    with path.open(encoding="utf-8", newline="" if fmt == "csv" else None) as fh:
        if fmt == "jsonl":
            for n, raw in enumerate(fh, start=1):
                if not raw.strip():
                    continue
                try:
                    obj = json.loads(raw)
                except json.JSONDecodeError as exc:
                    raise DatasetError(path, n, f"invalid JSON ({exc.msg})") from None
                if not isinstance(obj, dict):
                    raise DatasetError(path, n, "each JSONL line must be an object")
                yield n, obj, None
            return
        if fmt == "csv":
            reader = csv.reader(fh)
            names = None
            for cells in reader:
                n = reader.line_num
                if not cells or (len(cells) == 1 and not cells[0].strip()):
                    continue
                if header and names is None:
                    names = [c.strip() for c in cells]
                    continue
                yield n, cells, names
            return
        names = None
        for n, raw in enumerate(fh, start=1):
            line = raw.rstrip("\r\n")
            if not line.strip():
                continue
            cells = line.split("\t")
            if header and names is None:
                names = [c.strip() for c in cells]
                continue
            yield n, cells, names


class _Columns(TypedDict):
    text: int
    pair: int | None
    label: int


@overload
def _column_index(path: Path, spec: str | None, names: list[str] | None, defaults: Sequence[str],
                  role: str, required: Literal[True]) -> int: ...


@overload
def _column_index(path: Path, spec: str | None, names: list[str] | None, defaults: Sequence[str],
                  role: str, required: bool) -> int | None: ...


def _column_index(path: Path, spec: str | None, names: list[str] | None, defaults: Sequence[str],
                  role: str, required: bool) -> int | None:
    """Resolve a column given by name or 0-based index (or the first default name present)."""
    if spec is None:
        for name in defaults:
            if names and name in names:
                return names.index(name)
        if required:
            if names is None:
                raise DatasetError(path, 1, f"no header: give the {role} column as a 0-based index")
            raise DatasetError(path, 1, f"no {role} column among {names}; pass --{role}-column")
        return None
    if spec.lstrip("-").isdigit():
        return int(spec)
    if names is None:
        raise DatasetError(path, 1, f"{role} column '{spec}' given by name, but the file has no header")
    if spec not in names:
        raise DatasetError(path, 1, f"no column '{spec}' in header {names}")
    return names.index(spec)


def _cell(path: Path, n: int, cells: list[str], idx: int, role: str) -> str:
    if idx >= len(cells) or idx < -len(cells):
        raise DatasetError(path, n, f"expected at least {idx + 1} columns for the {role}, found {len(cells)}")
    return cells[idx]


def read_table(path: Path, head: str, columns: TableColumns, fmt: str) -> Iterator[Example]:
    """TSV/CSV/JSONL rows -> examples. The target column holds a label, labels or a score by head."""
    width: int | None = None
    idx: _Columns | None = None
    for n, rec, names in _records(path, fmt, columns.header and fmt != "jsonl"):
        if isinstance(rec, dict):
            text = _json_field(path, n, rec, columns.text, TEXT_COLUMNS, "text", True)
            pair = _json_field(path, n, rec, columns.pair, PAIR_COLUMNS, "pair", False)
            target = _json_field(path, n, rec, columns.label, LABEL_COLUMNS, "label", True)
        else:
            if idx is None:
                width = len(names) if names is not None else len(rec)
                idx = {
                    "text": _column_index(path, columns.text, names, TEXT_COLUMNS, "text", True),
                    "pair": _column_index(path, columns.pair, names, PAIR_COLUMNS, "pair", False),
                    "label": _column_index(path, columns.label, names, LABEL_COLUMNS, "label", True),
                }
            if fmt == "tsv" and len(rec) != width:
                raise DatasetError(path, n, f"expected {width} tab-separated columns, found {len(rec)}")
            text = _cell(path, n, rec, idx["text"], "text")
            pair = _cell(path, n, rec, idx["pair"], "pair") if idx["pair"] is not None else None
            target = _cell(path, n, rec, idx["label"], "label") if idx["label"] is not None else None
        yield _text_example(path, n, head, text, pair, target, columns.label_sep)


def _json_field(path: Path, n: int, obj: dict[str, Any], spec: str | None, defaults: Sequence[str], role: str,
                required: bool) -> Any:
    keys = [spec] if spec is not None else list(defaults)
    for key in keys:
        if key in obj:
            return obj[key]
    if required:
        raise DatasetError(path, n, f"no {role} field (looked for {', '.join(map(repr, keys))})")
    return None


def _text_example(path: Path, n: int, head: str, text, pair, target, sep: str) -> Example:
    if not isinstance(text, str) or not text.strip():
        raise DatasetError(path, n, "empty text")
    if pair is not None and (not isinstance(pair, str) or not pair.strip()):
        raise DatasetError(path, n, "empty second text")
    text, pair = text.strip(), pair.strip() if pair is not None else None
    try:
        return kind_of(head).example_from_record(text, pair, target, label_sep=sep, line=n)
    except ValueError as exc:
        raise DatasetError(path, n, str(exc)) from None


# --- CoNLL ---------------------------------------------------------------------------------------


def read_conll(path: Path | str, tag_column: int = -1) -> Iterator[TokenExample]:
    """CoNLL-2003 style: `word ... TAG` per line, blank line between sentences, `-DOCSTART-` skipped.

    Tags must be IOB2 ('O', 'B-X', 'I-X'). The word is the first field, the tag the `tag_column`-th.
    """
    path = Path(path)
    tokens: list[str] = []
    tags: list[str] = []
    start = 0
    with path.open(encoding="utf-8") as fh:
        for n, raw in enumerate(fh, start=1):
            line = raw.strip()
            if not line or line.startswith("-DOCSTART-"):
                if tokens:
                    yield TokenExample(tuple(tokens), tuple(tags), start)
                tokens, tags = [], []
                continue
            parts = line.split()
            if len(parts) < 2:
                raise DatasetError(path, n, f"expected 'word ... TAG', found {line!r}")
            tag = parts[tag_column]
            if tag != "O" and not (tag[:2] in ("B-", "I-") and len(tag) > 2):
                raise DatasetError(path, n, f"tag {tag!r} is not IOB2 ('O', 'B-<type>' or 'I-<type>')")
            if not tokens:
                start = n
            tokens.append(parts[0])
            tags.append(tag)
    if tokens:
        yield TokenExample(tuple(tokens), tuple(tags), start)


# --- SQuAD ---------------------------------------------------------------------------------------


def read_squad(path: Path | str) -> Iterator[QAExample]:
    """SQuAD v1.1 JSON (`data[].paragraphs[].qas[]`); every answer span is checked against its context."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DatasetError(path, exc.lineno, f"invalid JSON ({exc.msg}, column {exc.colno})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise DatasetError(path, None, "not SQuAD JSON: expected an object with a 'data' list")
    for a, article in enumerate(doc["data"]):
        title = str(article.get("title", f"article-{a}")) if isinstance(article, dict) else ""
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        if not isinstance(paragraphs, list):
            raise DatasetError(path, f"data[{a}]", "article has no 'paragraphs' list")
        for p, para in enumerate(paragraphs):
            where = f"data[{a}].paragraphs[{p}]"
            context = para.get("context") if isinstance(para, dict) else None
            if not isinstance(context, str) or not isinstance(para.get("qas"), list):
                raise DatasetError(path, where, "paragraph needs a 'context' string and a 'qas' list")
            for q, qa in enumerate(para["qas"]):
                yield _qa_example(path, f"{where}.qas[{q}]", title, context, qa)


def _qa_example(path: Path, where: str, title: str, context: str, qa) -> QAExample:
    if not isinstance(qa, dict) or not isinstance(qa.get("question"), str) or not qa["question"].strip():
        raise DatasetError(path, where, "question needs a non-empty 'question' string")
    answers = []
    for k, ans in enumerate(qa.get("answers") or []):
        text, start = (ans.get("text"), ans.get("answer_start")) if isinstance(ans, dict) else (None, None)
        if not isinstance(text, str) or not isinstance(start, int):
            raise DatasetError(path, f"{where}.answers[{k}]", "answer needs 'text' and an integer 'answer_start'")
        if context[start : start + len(text)] != text:
            raise DatasetError(path, f"{where}.answers[{k}]",
                               f"answer {text!r} is not at character {start} of the context")
        answers.append((text, start))
    if not answers:
        raise DatasetError(path, where, "question has no answer (SQuAD v2 unanswerable questions are not supported)")
    return QAExample(str(qa.get("id", where)), title, qa["question"].strip(), context, tuple(answers))


def split_by_article(examples: Sequence[QAExample], eval_articles: int, seed: int = 0,
                     ) -> tuple[list[QAExample], list[QAExample]]:
    """Hold out `eval_articles` whole articles (chosen with `random.Random(seed)`) as the eval split, so no
    context is shared between train and eval. Returns (train, eval), each in file order."""
    titles = list(dict.fromkeys(e.title for e in examples))
    if not 0 < eval_articles < len(titles):
        raise ValueError(f"eval_articles must be between 1 and {len(titles) - 1} (the file has {len(titles)} articles)")
    held = set(random.Random(seed).sample(titles, eval_articles))
    return [e for e in examples if e.title not in held], [e for e in examples if e.title in held]


def split_holdout(examples: Sequence[Example], holdout: int, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """Hold out `holdout` examples (chosen with `random.Random(seed)`) of a training file as the split that
    picks the best epoch, so that the real eval split is never looked at while training. Returns (train,
    held out), each in file order."""
    if not 0 < holdout < len(examples):
        raise ValueError(f"holdout must be between 1 and {len(examples) - 1} (the file has {len(examples)} examples)")
    held = set(random.Random(seed).sample(range(len(examples)), holdout))
    return ([e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held])
