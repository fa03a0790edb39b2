"""Shared fixtures: tiny encoders built in code (fast unit tests), the packaged MiniLM (integration tests),
and helpers to make valid bundles for any head type."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

from service.bundles.codec import encode_bundle  # noqa: E402
from service.bundles.manifest import AdapterConfig, BackboneRef, HeadConfig, HeadType, Manifest  # noqa: E402
from service.bundles.store import LocalAdapterStore  # noqa: E402
from service.modeling.backbone import Backbone, load_backbone, resolve_backbone_path  # noqa: E402
from service.settings import DEFAULT_BACKBONE  # noqa: E402
from tests.synthetic import random_tensors  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DATASETS = SHARED / "datasets"

LABELS: dict[HeadType, list[str]] = {
    HeadType.CLASSIFICATION: ["negative", "positive"],
    HeadType.MULTILABEL: ["sports", "politics", "tech"],
    HeadType.REGRESSION: ["score"],
    HeadType.TOKEN_CLASSIFICATION: ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"],
    HeadType.QA: [],
}


def _save_tiny(kind: str, out: Path) -> Path:
    """Save a randomly initialised tiny encoder of `kind` plus the MiniLM tokenizer into `out`."""
    from transformers import AutoModel, AutoTokenizer, BertConfig, DistilBertConfig, RobertaConfig

    torch.manual_seed({"bert": 0, "roberta": 1, "distilbert": 2}[kind])
    common = dict(vocab_size=30522, max_position_embeddings=128)
    if kind == "bert":
        cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, **common)
    elif kind == "roberta":
        cfg = RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                            type_vocab_size=2, pad_token_id=0, **common)
    else:
        cfg = DistilBertConfig(dim=32, hidden_dim=64, n_layers=2, n_heads=2, **common)
    AutoModel.from_config(cfg).save_pretrained(out)
    AutoTokenizer.from_pretrained(resolve_backbone_path(DEFAULT_BACKBONE)).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {kind: _save_tiny(kind, root / kind) for kind in ("bert", "roberta", "distilbert")}


@pytest.fixture
def tiny_backbone(tiny_model_dirs) -> Backbone:
    """A fresh tiny BERT (2 layers, hidden 32), float32 on CPU. Fresh per test: engines modify it in place."""
    return load_backbone(str(tiny_model_dirs["bert"]), device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def minilm_dir() -> str:
    return resolve_backbone_path(DEFAULT_BACKBONE)


@pytest.fixture
def minilm_backbone() -> Backbone:
    return load_backbone(DEFAULT_BACKBONE, device="cpu", dtype="float32")


@pytest.fixture
def store(tmp_path) -> LocalAdapterStore:
    return LocalAdapterStore(tmp_path / "store")


def make_manifest(
    ref: BackboneRef, task: str = "sst2", head_type: HeadType = HeadType.CLASSIFICATION, *,
    labels: list[str] | None = None, adapter: AdapterConfig | None | str = "default", **head_cfg,
) -> Manifest:
    if adapter == "default":
        adapter = AdapterConfig(bottleneck=8)
    return Manifest(
        task=task, head_type=head_type, labels=LABELS[head_type] if labels is None else labels,
        head=HeadConfig(**head_cfg), adapter=adapter, backbone=ref,
    )


def make_bundle(manifest: Manifest, seed: int = 0, std: float = 0.2) -> bytes:
    return encode_bundle(manifest, random_tensors(manifest, seed=seed, std=std))
