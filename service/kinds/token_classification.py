"""Token classification (NER): a BIO tag per word, entities out; entity-level F1 as seqeval computes it.

A CoNLL sentence is sent as its words joined by single spaces. The head tags each *tokenizer* word by its
first sub-token, and the tokenizer may split one CoNLL word into several (e.g. "U.S." -> "U", ".", "S",
"."). So the first sub-token of every tokenizer word is trained: with the CoNLL tag for the first piece of a
word, and its continuation (B-X/I-X -> I-X, O -> O) for later pieces; other sub-tokens and special tokens
are ignored (IGNORE_INDEX).
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F

from service.kinds import metrics as M
from service.kinds.base import Targets, TaskKind, label_index
from service.kinds.examples import Example, TokenExample
from service.kinds.heads import IGNORE_INDEX, TokenHead
from service.kinds.rows import EncodedRow


class TokenClassificationHead(TokenHead):
    # targets [n, T], IGNORE_INDEX where no label (subtokens, specials)
    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                               ignore_index=IGNORE_INDEX)

    def word_tags(self, logits: torch.Tensor, row: EncodedRow) -> list[tuple[int, str, float, int, int]]:
        """(word index, tag, prob, char start, char end) per word, tagged by the word's first token."""
        probs = torch.softmax(logits[: len(row)].float(), -1)
        best_p, best = probs.max(-1)
        words: dict[int, tuple[int, str, float, int, int]] = {}
        for t, w in enumerate(row.word_ids):
            if w is None or row.sequence_ids[t] != 0:
                continue
            start, end = row.offsets[t]
            if w not in words:
                words[w] = (w, self.labels[int(best[t])], float(best_p[t]), start, end)
            else:
                words[w] = (*words[w][:4], end)
        return list(words.values())

    def postprocess(self, logits: torch.Tensor, row: EncodedRow) -> dict[str, Any]:
        entities: list[dict[str, Any]] = []
        current: dict[str, Any] | None = None
        scores: list[float] = []

        def close() -> None:
            if current is not None:
                current["text"] = row.text[current["start"] : current["end"]]
                current["score"] = sum(scores) / len(scores)
                entities.append(current)

        for _, tag, p, start, end in self.word_tags(logits, row):
            kind = tag[2:] if tag != "O" else None
            if kind is not None and current is not None and tag.startswith("I-") and current["entity"] == kind:
                current["end"] = end
                scores.append(p)
                continue
            close()
            current, scores = None, []
            if kind is not None:  # B-X, or an I-X that does not continue an X: starts an entity
                current = {"entity": kind, "text": "", "start": start, "end": end, "score": 0.0}
                scores = [p]
        close()
        return {"entities": [{k: e[k] for k in ("entity", "text", "start", "end", "score")} for e in entities]}


def token_examples(examples: Sequence[Example]) -> Sequence[TokenExample]:
    """The examples of this kind (it asked the readers for TokenExamples)."""
    return cast("Sequence[TokenExample]", examples)


class TokenClassificationKind(TaskKind):
    name: ClassVar[str] = "token-classification"
    head_class = TokenClassificationHead
    sequence_level: ClassVar[bool] = False
    accepts_pairs: ClassVar[bool] = False
    dataset_formats: ClassVar[tuple[str, ...]] = ("conll",)
    metrics: ClassVar[tuple[str, ...]] = ("f1", "precision", "recall")
    default_metric: ClassVar[str] = "f1"

    def label_problem(self, labels: Sequence[str]) -> str | None:
        if "O" not in labels:
            return "token-classification labels are BIO tags and must include 'O'"
        bad = [x for x in labels if x != "O" and not (x[:2] in ("B-", "I-") and len(x) > 2)]
        if bad:
            return f"token-classification labels must be 'O', 'B-<type>' or 'I-<type>'; got {bad[:3]}"
        return None

    def infer_labels(self, examples: Sequence[Example], order: Sequence[str] | None = None) -> list[str]:
        """'O', then B-X and I-X for every entity type X (sorted)."""
        types = sorted({t[2:] for ex in token_examples(examples) for t in ex.tags if t != "O"})
        return ["O"] + [f"{p}-{t}" for t in types for p in ("B", "I")]

    def serving_inputs(self, examples: Sequence[Example]) -> tuple[list[str], list[str] | None]:
        return [e.text for e in token_examples(examples)], None

    def targets(self, rows: Sequence[EncodedRow], examples: Sequence[Example], labels: Sequence[str]) -> Targets:
        index = label_index(labels)
        return Targets(list(rows), [token_targets(r, e, index) for r, e in zip(rows, token_examples(examples))])

    def collate(self, targets: Sequence[Any], width: int) -> torch.Tensor:
        out = torch.full((len(targets), width), IGNORE_INDEX, dtype=torch.long)
        for i, t in enumerate(targets):
            out[i, : len(t)] = torch.tensor(t, dtype=torch.long)
        return out

    def score(self, examples: Sequence[Example], predictions: Sequence[dict[str, Any]], labels: Sequence[str],
              extra: Sequence[str] = ()) -> dict[str, float]:
        sentences = token_examples(examples)
        gold = [M.bio_spans(e.tags) for e in sentences]
        pred = [entity_token_spans(e.tokens, p["entities"]) for e, p in zip(sentences, predictions)]
        return M.entity_scores(gold, pred)


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


def entity_token_spans(tokens: Sequence[str], entities: Sequence[dict[str, Any]]) -> list[M.Span]:
    """Serving entities (character spans in the space-joined sentence) -> (type, first word, last word + 1)."""
    starts = word_starts(tokens)
    spans: list[M.Span] = []
    for ent in entities:
        first = bisect.bisect_right(starts, ent["start"]) - 1
        last = bisect.bisect_right(starts, max(ent["end"] - 1, ent["start"])) - 1
        spans.append((ent["entity"], first, last + 1))
    return spans
