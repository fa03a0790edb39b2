"""Zero-shot reference for STS-B: cosine of the frozen backbone's own sentence embeddings (no training).

    .venv/bin/python bench/stsb_cosine.py [--eval ../shared/datasets/stsb/dev.tsv]

all-MiniLM-L6-v2 was trained as a sentence-similarity bi-encoder, so this is the fairest "frozen backbone"
baseline for STS-B (docs/accuracy.md compares it with the shipped adapter). Embeddings come from the
serving engine's plain-backbone path (`POST /embed`): mean pooling, L2-normalised.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script (`python bench/stsb_cosine.py`), the import path starts at bench/, not at the repo
# root: put the root first, for the bench.*, service.* and tests.* imports.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import csv
import json

import torch

from service.bundles.store import LocalAdapterStore
from service.kinds.metrics import pearson, spearman
from service.modeling.backbone import load_backbone
from service.runtime.engine import Engine, RowRequest

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eval", type=Path, default=REPO.parent / "shared" / "datasets" / "stsb" / "dev.tsv")
    args = ap.parse_args()
    with args.eval.open(newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
    engine = Engine(load_backbone(device="cpu"), LocalAdapterStore(REPO / "adapters_store"))

    def embed(texts: list[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), 64):
            results = engine.run([RowRequest(None, 0, r) for r in engine.encode(None, texts[i : i + 64])])
            out += [torch.tensor(r.prediction["embedding"]) for r in results]
        return torch.stack(out)

    a, b = embed([r["sentence1"] for r in rows]), embed([r["sentence2"] for r in rows])
    cosine = (a * b).sum(-1).tolist()
    gold = [float(r["score"]) for r in rows]
    print(json.dumps({"eval_file": str(args.eval), "pairs": len(rows), "pearson": round(pearson(cosine, gold), 4),
                      "spearman": round(spearman(cosine, gold), 4)}))


if __name__ == "__main__":
    main()
