"""Write service/modeling/calibration.txt: the texts the `int8` mode calibrates its smoothing on at start-up.

    .venv/bin/python bench/make_calibration.py

64 texts each from the TRAIN splits of sst2, ag_news, mrpc (both sentences, joined) and conll2003 in
../shared/datasets (seeded; the accuracy gate scores the dev/test splits, which these never touch). Runs once;
the file is committed.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "datasets"
OUT = REPO / "service" / "modeling" / "calibration.txt"
PER_SOURCE = 64


def conll_sentences(path: Path) -> list[str]:
    sentences, words = [], []
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("-DOCSTART-"):
            if len(words) >= 5:
                sentences.append(" ".join(words))
            words = []
        else:
            words.append(line.split()[0])
    return sentences


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=OUT, help="where to write the texts")
    args = ap.parse_args()
    rng = random.Random(20261129)
    rows = lambda p: (DATA / p).read_text().splitlines()[1:]  # noqa: E731
    sources = {
        "sst2/train.tsv": [r.split("\t")[0].strip() for r in rows("sst2/train.tsv") if len(r.split()) >= 5],
        "ag_news/train.tsv": [r.split("\t")[2].strip() for r in rows("ag_news/train.tsv")],
        "mrpc/train.tsv": [f"{c[3]} {c[4]}" for r in rows("mrpc/train.tsv") if len(c := r.split("\t")) == 5],
        "conll2003/train.txt": conll_sentences(DATA / "conll2003" / "train.txt"),
    }
    texts = [t.replace("\n", " ") for pool in sources.values() for t in rng.sample(pool, PER_SOURCE)]
    header = ("# Calibration texts of the int8 mode (service/modeling/smoothing.py), written by "
              "bench/make_calibration.py:\n# 64 each from the train splits of " + ", ".join(sources) + ".\n")
    args.out.write_text(header + "\n".join(texts) + "\n")
    print(f"wrote {len(texts)} texts, {args.out.stat().st_size} bytes to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
