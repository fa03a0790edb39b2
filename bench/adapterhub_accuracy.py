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
import io
import json
import random
import shutil
import subprocess
import tempfile
import time
import zipfile

from bench.common import REPO, machine
from bench.peft_accuracy import DATA, LABELS, load

PEER_VENV = Path("/tmp/peervenv")
SETUP = REPO.parent / "shared" / "peers" / "adapterhub" / "setup.sh"


async def service_predictions(folder: Path, dev: list[tuple[str, int]], store: Path) -> list[int]:
    import httpx

    from service.api.app import create_app
    from service.settings import ServiceSettings

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for p in folder.iterdir():
            zf.write(p, p.name)
    app = create_app(ServiceSettings(admin_token="bench", store_dir=store, dtype="float32", max_seq_length=64))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench", timeout=120) as client:
            r = await client.post("/adapters", headers={"Authorization": "Bearer bench"},
                                  files={"file": ("sst2-ah.zip", buf.getvalue())}, data={"task": "sst2-ah"})
            r.raise_for_status()
            preds: list[int] = []
            for i in range(0, len(dev), 32):
                got = await client.post("/predict/sst2-ah", json={"texts": [t for t, _ in dev[i : i + 32]]})
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
    python = PEER_VENV / "bin" / "python"
    if not python.exists() or subprocess.run([str(python), "-c", "import adapters"], capture_output=True).returncode:
        subprocess.run(["bash", str(SETUP)], check=True)
    train = load(DATA / "train.tsv")
    train = random.Random(args.seed).sample(train, min(args.train_examples, len(train)))
    dev = load(DATA / "dev.tsv")
    work = Path(tempfile.mkdtemp(prefix="bench-adapterhub-"))
    try:
        (work / "data.json").write_text(json.dumps({"train": train, "dev": dev, "epochs": args.epochs,
                                                    "seed": args.seed}))
        t0 = time.perf_counter()
        subprocess.run([str(PEER_VENV / "bin" / "python"), str(REPO / "bench" / "peers" / "adapterhub_train.py"),
                        str(work / "data.json"), str(work)], check=True)
        train_s = time.perf_counter() - t0
        lib = json.loads((work / "result.json").read_text())["predictions"]
        svc = asyncio.run(service_predictions(work / "adapter", dev, work / "store"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    gold = [y for _, y in dev]
    acc_lib = sum(p == g for p, g in zip(lib, gold)) / len(gold)
    acc_svc = sum(p == g for p, g in zip(svc, gold)) / len(gold)
    differ = sum(a != b for a, b in zip(lib, svc))
    report = {"machine": machine(), "command": "python " + " ".join(sys.argv), "train_examples": len(train),
              "epochs": args.epochs, "train_seconds": round(train_s, 1), "dev_examples": len(dev),
              "accuracy_adapters_itself": round(acc_lib, 4), "accuracy_through_the_service": round(acc_svc, 4),
              "predictions_that_differ": differ}
    print(f"SST-2 dev ({len(dev)}): adapters itself {acc_lib:.4f}, through the service {acc_svc:.4f}, "
          f"{differ} predictions differ (trained on {len(train)} x {args.epochs} in {train_s:.0f} s)")
    print(json.dumps(report))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
