"""The shipped bundles load in the service's engine (packaged MiniLM) and score what their manifests (and
docs/accuracy.md) state, re-scored from the eval files in ../shared/datasets through `Engine.run`.

Every task is re-scored on its whole eval file except AG News (7,600 rows, ~1 min on 2 cores): there the
test scores a fixed prefix whose expected accuracy is recorded below; `make rescore-shipped` (the
`evaluate` command) re-scores the whole file, which gives the manifest's number.
"""

from __future__ import annotations

import pytest

from service.bundles.store import LocalAdapterStore
from service.modeling.backbone import load_backbone
from service.settings import DEFAULT_BACKBONE
from service.training.data import examples_for_bundle
from service.training.evaluation import engine_for, evaluate_task
from tests.conftest import DATASETS, REPO

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not DATASETS.is_dir(), reason="../shared/datasets is not present"),
]

STORE = REPO / "adapters_store"
TASKS = ["sst2", "ag_news", "mrpc", "stsb", "conll2003", "squad"]
PREFIX: dict[str, tuple[int, dict[str, float]]] = {
    # task: (first N eval rows, expected metrics on them) -- recorded from `adapter-service evaluate`
    "ag_news": (1500, {"accuracy": 0.897333, "macro_f1": 0.894501}),
}


@pytest.fixture(scope="module")
def engine():
    backbone = load_backbone(DEFAULT_BACKBONE, device="cpu", dtype="float32")
    return engine_for(backbone, LocalAdapterStore(STORE))


@pytest.mark.parametrize("task", TASKS)
def test_shipped_bundle_rescored_by_the_engine_matches_its_manifest(task, engine):
    manifest = engine.store.get_info(task, engine.store.get_active(task)).manifest
    examples = examples_for_bundle(manifest, REPO / manifest.training["eval_file"])
    assert len(examples) == manifest.training["eval_examples"]
    expected = manifest.metrics
    if task in PREFIX:
        n, expected = PREFIX[task]
        examples = examples[:n]
    got = evaluate_task(engine, task, examples, batch_size=64).metrics
    assert got == pytest.approx(expected, abs=1e-4), (task, got)
