"""Tokenisation into rows that remember where each token came from (for entities and answer spans)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from service.kinds.rows import EncodedRow

__all__ = ["EncodedRow", "Encoder"]

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class Encoder:
    """Wraps a fast tokenizer: texts (and pairs) -> EncodedRow, rows -> padded tensors."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int, use_token_type_ids: bool):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.use_token_type_ids = use_token_type_ids and "token_type_ids" in tokenizer.model_input_names
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def encode(
        self, texts: Sequence[str], pairs: Sequence[str] | None = None, *, max_length: int | None = None,
        qa: bool = False,
    ) -> list[EncodedRow]:
        """Tokenise a list of texts (with optional second texts). For QA, `texts` are questions and `pairs`
        contexts, and only the context is truncated."""
        limit = min(max_length or self.max_length, self.max_length)
        truncation = "only_second" if qa else True
        enc = self.tokenizer(
            list(texts), list(pairs) if pairs is not None else None, truncation=truncation, max_length=limit,
            return_offsets_mapping=True, return_token_type_ids=self.use_token_type_ids,
            return_attention_mask=False,
        )
        rows = []
        for i, text in enumerate(texts):
            e = enc.encodings[i]
            rows.append(
                EncodedRow(
                    input_ids=tuple(enc["input_ids"][i]),
                    token_type_ids=tuple(enc["token_type_ids"][i]) if self.use_token_type_ids else None,
                    offsets=tuple(tuple(o) for o in enc["offset_mapping"][i]),
                    sequence_ids=tuple(e.sequence_ids),
                    word_ids=tuple(e.word_ids),
                    truncated=bool(e.overflowing),
                    text=text,
                    text_pair=pairs[i] if pairs is not None else None,
                )
            )
        return rows

    def collate(self, rows: Sequence[EncodedRow], device: torch.device) -> dict[str, torch.Tensor]:
        """Pad rows to the longest one: input_ids / attention_mask (/ token_type_ids) [B, T]."""
        T = max(len(r) for r in rows)
        ids = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        types = torch.zeros((len(rows), T), dtype=torch.long) if self.use_token_type_ids else None
        for i, r in enumerate(rows):
            n = len(r)
            ids[i, :n] = torch.tensor(r.input_ids)
            mask[i, :n] = 1
            if types is not None and r.token_type_ids is not None:
                types[i, :n] = torch.tensor(r.token_type_ids)
        batch = {"input_ids": ids, "attention_mask": mask}
        if types is not None:
            batch["token_type_ids"] = types
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}

    def collate_packed(self, rows: Sequence[EncodedRow], device: torch.device,
                       extra_pad_tokens: int = 0) -> dict[str, torch.Tensor]:
        """Concatenate rows' real tokens: input_ids (/ token_type_ids) [N], no padding between rows; then
        `extra_pad_tokens` pad tokens (filler rows that round the batch up to a size bucket)."""
        ids = torch.tensor([t for r in rows for t in r.input_ids] + [self.pad_id] * extra_pad_tokens, dtype=torch.long)
        batch = {"input_ids": ids}
        if self.use_token_type_ids:
            batch["token_type_ids"] = torch.tensor(
                [t for r in rows for t in (r.token_type_ids or (0,) * len(r))] + [0] * extra_pad_tokens,
                dtype=torch.long)
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
