"""Batches for training and evaluation: length-grouped (little padding), seeded, and padded dynamically.

Length grouping works like `transformers`' `group_by_length` and the AdapterHub peer's runs: shuffle,
cut into mega-batches of 50 batches, sort each by length, cut into batches, shuffle the batch order (no
short-to-long curriculum). Every example is seen once per epoch, with far less padding than random batches
(measured in docs/training.md, "Fast on CPU").
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, overload

import torch

from service.kinds import kind_of
from service.modeling.encoding import EncodedRow, Encoder

MEGA_BATCHES = 50


def grouped_batches(lengths: Sequence[int], batch_size: int, rng: random.Random, mega: int = MEGA_BATCHES,
                    ) -> list[list[int]]:
    """Index batches for one epoch (see the module docstring); `rng` carries on across epochs."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    out: list[list[int]] = []
    for m in range(0, len(order), mega * batch_size):
        chunk = sorted(order[m : m + mega * batch_size], key=lambda j: lengths[j], reverse=True)
        out.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(out)
    return out


def sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Evaluation batches: rows in length order (results do not depend on the order, padding does)."""
    order = sorted(range(len(lengths)), key=lambda j: lengths[j])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def collate_targets(head: str, targets: Sequence[Any], width: int) -> torch.Tensor:
    """Targets of one batch as the head's `loss` expects them (token targets padded to `width`)."""
    return kind_of(head).collate(targets, width)


@overload
def make_batch(encoder: Encoder, head: str, rows: Sequence[EncodedRow], targets: Sequence[Any],
               device: torch.device) -> tuple[dict[str, torch.Tensor], torch.Tensor]: ...


@overload
def make_batch(encoder: Encoder, head: str, rows: Sequence[EncodedRow], targets: None,
               device: torch.device) -> tuple[dict[str, torch.Tensor], None]: ...


def make_batch(encoder: Encoder, head: str, rows: Sequence[EncodedRow], targets: Sequence[Any] | None,
               device: torch.device) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Padded inputs (+ targets) on `device`."""
    batch = encoder.collate(rows, device)
    if targets is None:
        return batch, None
    y = collate_targets(head, targets, batch["input_ids"].shape[1])
    return batch, y.to(device)
