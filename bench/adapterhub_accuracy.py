"""An AdapterHub bottleneck adapter trained with the real `adapters` library on a shipped dataset, imported,
and scored through the service's HTTP API: does the service give the accuracy the library measured itself?

    .venv/bin/python bench/adapterhub_accuracy.py [--train-examples 8000] [--epochs 2] [--out FILE]

SST-2 (../shared/datasets/sst2): a seeded sample of the training split; the packaged all-MiniLM-L6-v2 with
a Houlsby adapter (`double_seq_bn`: reduction factor 16, swish) and a 2-layer classification head, trained by
`bench/peers/adapterhub_train.py` in the AdapterHub peer's virtualenv (the library pins transformers 4.57;
built by its setup.sh when missing), AdamW lr 1e-3, batches of 32, max 64 tokens. The library scores SST-2
dev itself; the saved folder is zipped, uploaded to the app (`POST /adapters` with `task`, served
in-process through its ASGI interface, float32), and dev is scored again through `POST /predict/sst2-ah`.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script (`python bench/adapterhub_accuracy.py`), the import path starts at bench/, not at the repo
# root: put the root first, for the bench.*, service.* and tests.* imports.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import asyncio
import json
import random
import shutil
import subprocess
import tempfile
import time

from bench.common import REPO, SST2, accuracy_report, load_sst2, service_predictions

PEER_VENV = Path("/tmp/peervenv")
SETUP = REPO.parent / "shared" / "peers" / "adapterhub" / "setup.sh"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-examples", type=int, default=8000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="also write the JSON report here")
    args = ap.parse_args()
    python = PEER_VENV / "bin" / "python"
    if not python.exists() or subprocess.run([str(python), "-c", "import adapters"], capture_output=True).returncode:
        subprocess.run(["bash", str(SETUP)], check=True)
    train = load_sst2(SST2 / "train.tsv")
    train = random.Random(args.seed).sample(train, min(args.train_examples, len(train)))
    dev = load_sst2(SST2 / "dev.tsv")
    work = Path(tempfile.mkdtemp(prefix="bench-adapterhub-"))
    try:
        (work / "data.json").write_text(json.dumps({"train": train, "dev": dev, "epochs": args.epochs,
                                                    "seed": args.seed}))
        t0 = time.perf_counter()
        subprocess.run([str(PEER_VENV / "bin" / "python"), str(REPO / "bench" / "peers" / "adapterhub_train.py"),
                        str(work / "data.json"), str(work)], check=True)
        train_s = time.perf_counter() - t0
        lib = json.loads((work / "result.json").read_text())["predictions"]
        svc = asyncio.run(service_predictions(work / "adapter", dev, work / "store", "sst2-ah"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    accuracy_report("adapters", lib, svc, dev, len(train), args.epochs, train_s, args.out)


if __name__ == "__main__":
    main()
