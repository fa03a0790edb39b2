"""Task heads: one class per head type, each with its forward, its training loss and its post-processing
into the user-facing prediction. Parameter names match the bundle layout (`head.` prefix stripped)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from service.bundles.manifest import HeadConfig, HeadType, Manifest
from service.modeling.encoding import EncodedRow

IGNORE_INDEX = -100


def pool_tokens(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """[n, T, d] -> [n, d]: the [CLS] token, or the mean over real (mask = 1) tokens."""
    if pooling == "cls":
        return hidden[:, 0]
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


class TaskHead(nn.Module):
    """Base: maps the backbone's last hidden states of a task's rows to logits."""

    head_type: ClassVar[HeadType]

    def __init__(self, hidden: int, labels: list[str], config: HeadConfig, dropout: float = 0.1):
        super().__init__()
        self.labels = list(labels)
        self.config = config
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # [n,T,d], [n,T] -> logits
        raise NotImplementedError

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def postprocess(self, logits: torch.Tensor, row: EncodedRow) -> dict[str, Any]:
        """One row's logits (float32, CPU) -> the prediction returned to the user."""
        raise NotImplementedError


class SequenceHead(TaskHead):
    """Pool the tokens (mean over the mask, or [CLS]), optional d->d tanh layer, then d->C."""

    def __init__(self, hidden: int, labels: list[str], config: HeadConfig, dropout: float = 0.1):
        super().__init__(hidden, labels, config, dropout)
        self.dense = nn.Linear(hidden, hidden) if config.hidden_layer else None
        self.out = nn.Linear(hidden, self.output_size())

    def output_size(self) -> int:
        return len(self.labels)

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # -> [n, d]
        return pool_tokens(hidden, mask, self.config.pooling)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # -> [n, C]
        return self.from_pooled(self.pool(hidden, mask))

    def from_pooled(self, pooled: torch.Tensor) -> torch.Tensor:  # [n, d] -> [n, C]
        """The head after pooling; lets a mixed batch pool all rows at once."""
        x = self.dropout(pooled)
        if self.dense is not None:
            x = self.dropout(torch.tanh(self.dense(x)))
        logits: torch.Tensor = self.out(x)
        return logits


class ClassificationHead(SequenceHead):
    head_type = HeadType.CLASSIFICATION

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), targets)

    def postprocess(self, logits: torch.Tensor, row: EncodedRow) -> dict[str, Any]:
        probs = torch.softmax(logits.float(), -1).tolist()
        best = max(range(len(probs)), key=probs.__getitem__)
        return {"label": self.labels[best], "score": probs[best], "scores": dict(zip(self.labels, probs))}


class MultiLabelHead(SequenceHead):
    head_type = HeadType.MULTILABEL

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits.float(), targets.float())

    def postprocess(self, logits: torch.Tensor, row: EncodedRow) -> dict[str, Any]:
        probs = torch.sigmoid(logits.float()).tolist()
        on = [name for name, p in zip(self.labels, probs) if p >= self.config.threshold]
        return {"labels": on, "scores": dict(zip(self.labels, probs))}


class RegressionHead(SequenceHead):
    head_type = HeadType.REGRESSION

    def output_size(self) -> int:
        return 1

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(logits.float().squeeze(-1), targets.float())

    def postprocess(self, logits: torch.Tensor, row: EncodedRow) -> dict[str, Any]:
        return {"value": float(logits.float().reshape(-1)[0])}


class TokenHead(TaskHead):
    """Per-token d->C (token classification) or d->2 (QA start/end)."""

    def __init__(self, hidden: int, labels: list[str], config: HeadConfig, dropout: float = 0.1):
        super().__init__(hidden, labels, config, dropout)
        self.out = nn.Linear(hidden, self.output_size())

    def output_size(self) -> int:
        return len(self.labels)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # -> [n, T, C]
        logits: torch.Tensor = self.out(self.dropout(hidden))
        return logits


class TokenClassificationHead(TokenHead):
    head_type = HeadType.TOKEN_CLASSIFICATION

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


class QuestionAnsweringHead(TokenHead):
    head_type = HeadType.QA

    def output_size(self) -> int:
        return 2

    # targets [n, 2] = start and end token index
    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        start, end = logits.float().unbind(-1)
        return (F.cross_entropy(start, targets[:, 0]) + F.cross_entropy(end, targets[:, 1])) / 2

    def best_span(self, logits: torch.Tensor, row: EncodedRow) -> tuple[int, int, float] | None:
        """(start token, end token, probability) of the best span inside the context, or None."""
        ctx = [t for t, s in enumerate(row.sequence_ids) if s == 1]
        if not ctx:
            return None
        idx = torch.tensor(ctx)
        start = torch.log_softmax(logits[idx, 0].float(), -1)
        end = torch.log_softmax(logits[idx, 1].float(), -1)
        scores = start[:, None] + end[None, :]  # [Tc, Tc]: span (i, j)
        n = len(ctx)
        i = torch.arange(n)
        valid = (i[None, :] >= i[:, None]) & (i[None, :] - i[:, None] < self.config.max_answer_tokens)
        scores = scores.masked_fill(~valid, float("-inf"))
        flat = int(scores.argmax())
        s, e = divmod(flat, n)
        return ctx[s], ctx[e], float(scores[s, e].exp())

    def postprocess(self, logits: torch.Tensor, row: EncodedRow) -> dict[str, Any]:
        span = self.best_span(logits[: len(row)], row)
        if span is None:
            return {"answer": "", "start": 0, "end": 0, "score": 0.0}
        s, e, p = span
        start, end = row.offsets[s][0], row.offsets[e][1]
        return {"answer": (row.text_pair or "")[start:end], "start": start, "end": end, "score": p}


HEADS: dict[HeadType, type[TaskHead]] = {
    HeadType.CLASSIFICATION: ClassificationHead,
    HeadType.MULTILABEL: MultiLabelHead,
    HeadType.REGRESSION: RegressionHead,
    HeadType.TOKEN_CLASSIFICATION: TokenClassificationHead,
    HeadType.QA: QuestionAnsweringHead,
}


def build_head(manifest: Manifest, tensors: dict[str, torch.Tensor] | None = None) -> TaskHead:
    """The head a manifest describes; loaded from bundle tensors (`head.*`) when given."""
    cls = HEADS[manifest.head_type]
    if tensors is None:
        return cls(manifest.backbone.hidden_size, manifest.labels, manifest.head)
    # Built on the meta device and given the bundle's tensors: no random init that would be overwritten
    # (a third of a cold load's time).
    with torch.device("meta"):
        head = cls(manifest.backbone.hidden_size, manifest.labels, manifest.head)
    state = {k[len("head."):]: v for k, v in tensors.items() if k.startswith("head.")}
    head.load_state_dict(state, strict=True, assign=True)
    return head


def head_tensors(head: TaskHead) -> dict[str, torch.Tensor]:
    """Bundle tensors (`head.*`) of a head."""
    return {f"head.{k}": v.detach().float().cpu().clone() for k, v in head.state_dict().items()}
