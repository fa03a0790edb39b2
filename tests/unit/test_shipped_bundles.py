"""The shipped adapters_store/: every bundle valid, small, on the packaged backbone, with its metrics and the
exact command that trained it (no backbone is loaded here; tests/integration re-scores them)."""

from __future__ import annotations

import pytest

from service.bundles.codec import decode_bundle
from service.bundles.manifest import HeadType
from service.bundles.store import LocalAdapterStore
from service.settings import DEFAULT_BACKBONE
from tests.conftest import REPO

STORE = REPO / "adapters_store"
SHIPPED = {
    "sst2": HeadType.CLASSIFICATION,
    "ag_news": HeadType.CLASSIFICATION,
    "mrpc": HeadType.CLASSIFICATION,
    "stsb": HeadType.REGRESSION,
    "conll2003": HeadType.TOKEN_CLASSIFICATION,
    "squad": HeadType.QA,
}


def test_every_required_task_is_shipped():
    assert set(SHIPPED) <= set(LocalAdapterStore(STORE).list_tasks())


@pytest.mark.parametrize("task", sorted(SHIPPED))
def test_shipped_bundle_is_valid_small_and_documented(task):
    store = LocalAdapterStore(STORE)
    version = store.get_active(task)
    data = store.get_bytes(task, version)
    assert len(data) < 5 * 1024 * 1024
    bundle = decode_bundle(data, backbone=None, max_bytes=len(data))
    m = bundle.manifest
    assert m.task == task and m.head_type is SHIPPED[task] and m.backbone.id == DEFAULT_BACKBONE
    assert m.adapter is not None and m.metrics
    params = m.training["parameters"]
    assert params["trainable"] == sum(t.numel() for t in bundle.tensors.values())
    assert params["trainable"] <= 0.05 * params["backbone"]  # <= 5% of the backbone per task
    command = m.training["command"]
    assert command.startswith("adapter-service train ") and f"--task {task} " in command
    assert "--mode adapter" in command
    assert m.training["train_sha256"] and m.training["eval_file"]
