"""The SST-2 training loop and dev predictions both library benches use (`bench/peft_accuracy.py` in the
service's virtualenv, `bench/peers/adapterhub_train.py` in the AdapterHub peer's): torch and a tokenizer
only, so either environment imports it."""

from __future__ import annotations

import random

import torch


def train_classifier(model, tokenizer, train: list, epochs: int, seed: int, lr: float) -> None:
    """AdamW over the trainable parameters, shuffled batches of 32 (text, label) rows, max 64 tokens; leaves
    the model in eval mode."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    rng = random.Random(seed)
    model.train()
    for _ in range(epochs):
        order = list(range(len(train)))
        rng.shuffle(order)
        for i in range(0, len(order), 32):
            batch = [train[j] for j in order[i : i + 32]]
            enc = tokenizer([t for t, _ in batch], padding=True, truncation=True, max_length=64, return_tensors="pt")
            loss = model(**enc, labels=torch.tensor([y for _, y in batch])).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()


def predict_classes(model, tokenizer, rows: list) -> list[int]:
    """The model's class for each (text, label) row, in batches of 64."""
    preds: list[int] = []
    with torch.no_grad():
        for i in range(0, len(rows), 64):
            enc = tokenizer([t for t, _ in rows[i : i + 64]], padding=True, truncation=True, max_length=64,
                            return_tensors="pt")
            preds += model(**enc).logits.argmax(-1).tolist()
    return preds
