"""Shared helpers for the benchmarks: the same seeded traffic as the AdapterHub peer, and summary stats."""

from __future__ import annotations

import importlib.util
import io
import json
import platform
import statistics
import sys
import zipfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PEER_DIR = REPO.parent / "shared" / "peers" / "adapterhub"


def peer_sentences_module():
    """The peer's own sentence generator (`../shared/peers/adapterhub/sentences.py`), so both sides see the
    same traffic: seeded sentences of 8-30 words, tasks drawn uniformly at random."""
    path = PEER_DIR / "sentences.py"
    if not path.exists():
        sys.exit(f"benchmark traffic comes from {path}, which is missing (run from a checkout beside ../shared)")
    spec = importlib.util.spec_from_file_location("peer_sentences", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def random_task_store(root: Path, backbone_ref, n: int, bottleneck: int = 64, placement: str = "houlsby") -> list[str]:
    """A local store with `n` classification tasks (random Houlsby adapters + heads), named task00.. like the
    peer's make_tasks.py. Returns the task names."""
    from service.bundles.codec import encode_bundle
    from service.bundles.manifest import AdapterConfig, HeadType, Manifest
    from service.bundles.store import LocalAdapterStore
    from tests.synthetic import random_tensors

    store = LocalAdapterStore(root)
    names = [f"task{i:02d}" for i in range(n)]
    for i, name in enumerate(names):
        if name in store.list_tasks():
            continue
        manifest = Manifest(
            task=name, head_type=HeadType.CLASSIFICATION, labels=["negative", "positive"],
            adapter=AdapterConfig(placement=placement, bottleneck=bottleneck), backbone=backbone_ref,
        )
        store.put(name, encode_bundle(manifest, random_tensors(manifest, seed=i)))
    return names


def random_lora_tasks(root: Path, backbone_ref, n: int, rank: int = 8, targets: tuple[str, ...] = ("query", "value"),
                      ) -> list[str]:
    """`n` classification tasks with random LoRA (as imported from PEFT: r = `rank` on `targets`) + heads,
    named lora00.., added to the local store at `root`. Returns the task names."""
    from service.bundles.codec import encode_bundle
    from service.bundles.manifest import HeadConfig, HeadType, LoraConfig, Manifest
    from service.bundles.store import LocalAdapterStore
    from tests.synthetic import random_tensors

    store = LocalAdapterStore(root)
    names = [f"lora{i:02d}" for i in range(n)]
    for i, name in enumerate(names):
        if name in store.list_tasks():
            continue
        manifest = Manifest(task=name, head_type=HeadType.CLASSIFICATION, labels=["negative", "positive"],
                            head=HeadConfig(pooling="cls"), adapter=None, backbone=backbone_ref,
                            lora=LoraConfig(rank=rank, scaling=2.0, targets=targets))
        store.put(name, encode_bundle(manifest, random_tensors(manifest, seed=100 + i)))
    return names


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), as the peer's load generator computes it."""
    s = sorted(values)
    if not s:
        return float("nan")
    pos = (len(s) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def median(values: list[float]) -> float:
    return statistics.median(values)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {torch.get_num_threads()} torch threads, {gpu}, torch {torch.__version__}, python {platform.python_version()}"


# --- the library-accuracy benches (peft_accuracy.py, adapterhub_accuracy.py): SST-2, served through the API ---

SST2 = REPO.parent / "shared" / "datasets" / "sst2"
SST2_LABELS = ["negative", "positive"]


def load_sst2(path: Path) -> list[tuple[str, int]]:
    from service.training.readers import read_dataset

    return [(e.text, int(e.label)) for e in read_dataset(path, "classification")]


async def service_predictions(folder: Path, dev: list[tuple[str, int]], store: Path, task: str,
                              labels: list[str] | None = None) -> list[int]:
    """Upload `folder` zipped (`POST /adapters` with `task`, and `labels` when given) to the app served
    in-process through its ASGI interface (float32, 64 tokens), then the class of every dev row through
    `POST /predict/<task>`."""
    import httpx

    from service.api.app import create_app
    from service.settings import ServiceSettings

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for p in folder.iterdir():
            zf.write(p, p.name)
    form = {"task": task, **({"labels": ",".join(labels)} if labels else {})}
    app = create_app(ServiceSettings(admin_token="bench", store_dir=store, dtype="float32", max_seq_length=64))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench", timeout=120) as client:
            r = await client.post("/adapters", headers={"Authorization": "Bearer bench"},
                                  files={"file": (f"{task}.zip", buf.getvalue())}, data=form)
            r.raise_for_status()
            preds: list[int] = []
            for i in range(0, len(dev), 32):
                got = await client.post(f"/predict/{task}", json={"texts": [t for t, _ in dev[i : i + 32]]})
                got.raise_for_status()
                preds += [SST2_LABELS.index(p["label"]) for p in got.json()["predictions"]]
    return preds


def accuracy_report(library: str, lib: list[int], svc: list[int], dev: list[tuple[str, int]], train_examples: int,
           epochs: int, train_s: float, out: Path | None) -> None:
    """Print (and write to `out`) both accuracies and how many predictions differ."""
    gold = [y for _, y in dev]
    acc_lib = sum(p == g for p, g in zip(lib, gold)) / len(gold)
    acc_svc = sum(p == g for p, g in zip(svc, gold)) / len(gold)
    differ = sum(a != b for a, b in zip(lib, svc))
    result = {"machine": machine(), "command": "python " + " ".join(sys.argv), "train_examples": train_examples,
              "epochs": epochs, "train_seconds": round(train_s, 1), "dev_examples": len(dev),
              f"accuracy_{library}_itself": round(acc_lib, 4), "accuracy_through_the_service": round(acc_svc, 4),
              "predictions_that_differ": differ}
    print(f"SST-2 dev ({len(dev)}): {library} itself {acc_lib:.4f}, through the service {acc_svc:.4f}, "
          f"{differ} predictions differ (trained on {train_examples} x {epochs} in {train_s:.0f} s)")
    print(json.dumps(result))
    if out:
        out.write_text(json.dumps(result, indent=1) + "\n")
