"""Accuracy gate: every shipped task scored through the engine in every precision and packing mode, against
its float32 padded score (the gate: within 0.5 points; accuracy, F1 for NER and QA, Pearson for STS-B).

    .venv/bin/python bench/accuracy_gate.py [--modes float32:off,float32:on,bfloat16:on,int8:on] [--out FILE]

Each mode is `precision:packing` (ADAPTER_SERVICE_DTYPE : ADAPTER_SERVICE_PACKING); one backbone load per
mode, the tasks of `adapters_store/` scored on the whole eval split of docs/accuracy.md (../shared/datasets)
with `service.training.evaluation`, the same path as `adapter-service evaluate` (`make rescore-<task>`). Prints a Markdown table for
docs/accuracy.md and one JSON line; exit status 1 when a mode misses the gate on a task.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script (`python bench/accuracy_gate.py`), the import path starts at bench/, not at the repo
# root: put the root first, for the bench.*, service.* and tests.* imports.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import time

import torch

from bench.common import REPO, machine
from service.bundles.store import LocalAdapterStore
from service.modeling.backbone import load_backbone
from service.training.data import examples_for_bundle
from service.training.evaluation import engine_for, evaluate_task

GATE_POINTS = 0.5
HEADLINE = {"sst2": "accuracy", "ag_news": "accuracy", "mrpc": "accuracy", "stsb": "pearson",
            "conll2003": "f1", "squad": "f1"}
# The eval splits of docs/accuracy.md (the Makefile's EVAL_*): dev or test; for squad the XQuAD file, of which
# examples_for_bundle keeps the 8 articles the bundle held out.
EVAL_FILES = {"sst2": "sst2/dev.tsv", "ag_news": "ag_news/test.tsv", "mrpc": "mrpc/dev.tsv", "stsb": "stsb/dev.tsv",
              "conll2003": "conll2003/test.txt", "squad": "squad/dev_subset_xquad_en.json"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default="float32:off,float32:on,bfloat16:on,int8:on")
    ap.add_argument("--tasks", default=",".join(HEADLINE))
    ap.add_argument("--store", type=Path, default=REPO / "adapters_store")
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "datasets")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, help="also write the JSON report here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    store = LocalAdapterStore(args.store)
    tasks = args.tasks.split(",")
    examples = {}
    for task in tasks:
        manifest = store.get_info(task, store.get_active(task)).manifest
        examples[task] = examples_for_bundle(manifest, args.data / EVAL_FILES[task])
    scores: dict[str, dict[str, float]] = {}
    seconds: dict[str, float] = {}
    compute: dict[str, dict] = {}
    for mode in args.modes.split(","):
        precision, packing = mode.split(":")
        engine = engine_for(load_backbone(device="cpu", dtype=precision), store, packing=packing)
        compute[mode] = engine.compute_info()
        t0 = time.perf_counter()
        scores[mode] = {}
        for task in tasks:
            metrics = evaluate_task(engine, task, examples[task], batch_size=64).metrics
            scores[mode][task] = round(100 * metrics[HEADLINE[task]], 2)
            print(f"{mode:<14} {task:<10} {HEADLINE[task]} {scores[mode][task]:.2f}", flush=True)
        seconds[mode] = round(time.perf_counter() - t0, 1)
    reference = next(iter(scores))
    deltas = {m: {t: round(scores[m][t] - scores[reference][t], 2) for t in tasks} for m in scores}
    passed = {m: all(abs(d) <= GATE_POINTS for d in deltas[m].values()) for m in scores}
    print(f"\n| task (metric) | {' | '.join(scores)} |")
    print("|---|" + "---|" * len(scores))
    for t in tasks:
        cells = [f"{scores[m][t]:.2f}" + ("" if m == reference else f" ({deltas[m][t]:+.2f})") for m in scores]
        print(f"| {t} ({HEADLINE[t]}) | {' | '.join(cells)} |")
    print(f"| seconds to score all | {' | '.join(str(seconds[m]) for m in scores)} |")
    print(f"| within {GATE_POINTS} points of {reference} | {' | '.join('yes' if passed[m] else 'NO' for m in scores)} |")
    report = {"machine": machine(), "command": "python " + " ".join(sys.argv), "reference": reference,
              "scores": scores, "deltas": deltas, "within_gate": passed, "seconds": seconds, "compute": compute}
    print(json.dumps(report))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    sys.exit(0 if all(passed.values()) else 1)


if __name__ == "__main__":
    main()
