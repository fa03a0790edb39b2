"""Shared helpers for the benchmarks: the same seeded traffic as the AdapterHub peer, and summary stats."""

from __future__ import annotations

import importlib.util
import platform
import statistics
import sys
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
