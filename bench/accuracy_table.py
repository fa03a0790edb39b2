"""Print the accuracy table of docs/accuracy.md from the run summaries in docs/results/ (`--report` files).

    .venv/bin/python bench/accuracy_table.py [docs/results]

One row per task: the adapter, head-only and full fine-tuning scores on the eval split (best epoch), the
gaps, the parameters each adapter task trains (count and % of the backbone), its bundle size and the
training time of each run. A run that was not made shows as "-". Then the extra runs of docs/results/sweep/
(learning rate and task LayerNorms, checked on SST-2 dev) that chose the shipped settings.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TASKS = {  # task: (eval split, [(metric key, shown as)])
    "sst2": ("SST-2 dev (872)", [("accuracy", "acc")]),
    "ag_news": ("AG News test (7,600)", [("accuracy", "acc")]),
    "mrpc": ("MRPC dev (408)", [("accuracy", "acc"), ("macro_f1", "macro-F1")]),
    "stsb": ("STS-B dev (1,500)", [("pearson", "Pearson"), ("spearman", "Spearman")]),
    "conll2003": ("CoNLL-2003 test (3,453 sent.)", [("f1", "entity F1")]),
    "squad": ("XQuAD-en, 8 held-out articles", [("exact_match", "EM"), ("f1", "F1")]),
}
MODES = ("adapter", "head-only", "full")


def load(results: Path) -> dict[tuple[str, str], dict]:
    runs = {}
    for path in sorted(results.glob("*.json")):
        run = json.loads(path.read_text())
        runs[(run["task"], run["mode"])] = run
    return runs


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def gap(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None else f"{100 * (a - b):+.2f}"


def minutes(run: dict | None) -> str:
    return "-" if run is None else f"{run['train_seconds'] / 60:.1f}"


def table(runs: dict[tuple[str, str], dict]) -> str:
    head = ("| task | eval split | metric | adapter | head-only | full FT | adapter − full | adapter − head-only "
            "| trained params / task (% of backbone) | bundle | train min (adapter / head-only / full) |")
    lines = [head, "|" + "---|" * 3 + "---:|" * 8]
    for task, (split, metrics) in TASKS.items():
        got = {m: runs.get((task, m)) for m in MODES}
        adapter = got["adapter"]
        if adapter is None:
            continue
        p = adapter["params"]
        params = f"{p['trainable']:,} ({100 * p['trainable'] / p['backbone']:.2f}%)"
        size = f"{adapter['bundle_bytes'] / 1e6:.2f} MB" if adapter.get("bundle_bytes") else "-"
        times = " / ".join(minutes(got[m]) for m in MODES)
        for i, (key, name) in enumerate(metrics):
            score = {m: (got[m]["metrics"].get(key) if got[m] else None) for m in MODES}
            first = i == 0
            lines.append(
                f"| {task if first else ''} | {split if first else ''} | {name} | {pct(score['adapter'])} "
                f"| {pct(score['head-only'])} | {pct(score['full'])} | {gap(score['adapter'], score['full'])} "
                f"| {gap(score['adapter'], score['head-only'])} | {params if first else ''} "
                f"| {size if first else ''} | {times if first else ''} |"
            )
    return "\n".join(lines)


def sweep_table(folder: Path) -> str:
    """One row per extra run in `folder` (learning-rate, LayerNorm and seed checks), scored by the metric
    that picked its best epoch."""
    lines = ["| run | mode | epochs | lr | adapter m | task LayerNorms | grad clip | per epoch | best | train min |",
             "|---|---|---:|---:|---:|---|---|---|---:|---:|"]
    for path in sorted(folder.glob("*.json")):
        run = json.loads(path.read_text())
        cfg = run["config"]
        key = cfg.get("metric") or TASKS[run["task"]][1][0][0]  # the metric that picked the best epoch
        per_epoch = ", ".join(pct(e["metrics"].get(key)) for e in run["history"])
        adapter = run["mode"] == "adapter"
        layernorm = "yes" if cfg["train_layernorm"] and adapter else "no"
        width = cfg["bottleneck"] if adapter else "-"
        clip = cfg["max_grad_norm"] or "off"
        lines.append(f"| {path.stem} | {run['mode']} | {cfg['epochs']} | {cfg['lr']:g} | {width} | {layernorm} "
                     f"| {clip} | {per_epoch} "
                     f"| {pct(run['metrics'].get(key))} | {minutes(run)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="?", type=Path, default=REPO / "docs" / "results",
                    help="folder of run summaries (train --report files)")
    results = ap.parse_args().results
    print(table(load(results)))
    if (results / "sweep").is_dir():
        print()
        print(sweep_table(results / "sweep"))


if __name__ == "__main__":
    main()
