"""The shipped bundles load in the service's engine (packaged MiniLM) and score what their manifests (and
docs/accuracy.md) state, re-scored from the eval files in ../shared/datasets through `Engine.run`.

Every task is re-scored on its whole eval file except AG News (7,600 rows, ~1 min on 2 cores): there the
test scores a fixed prefix whose expected accuracy is recorded below; `make rescore-shipped` (the
`evaluate` command) re-scores the whole file, which gives the manifest's number.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from service.api.app import create_app
from service.bundles.store import LocalAdapterStore
from service.modeling.backbone import load_backbone
from service.runtime.runtime import Runtime
from service.settings import DEFAULT_BACKBONE, ServiceSettings
from service.training.data import examples_for_bundle
from service.training.evaluation import engine_for, evaluate_task
from service.training.features import serving_inputs
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


def test_the_shipped_sst2_scores_at_least_88_through_the_http_api(tmp_path):
    """What a user gets: SST-2 dev through `POST /predict/sst2` (64 texts a request) of the app as configured
    by default on this machine (its precision and packing), with the shipped store."""
    store = LocalAdapterStore(STORE)
    manifest = store.get_info("sst2", store.get_active("sst2")).manifest
    examples = examples_for_bundle(manifest, DATASETS / "sst2" / "dev.tsv")  # dev, not its training holdout
    texts, _ = serving_inputs(manifest.head_type, examples)
    app = create_app(Runtime(ServiceSettings(store_dir=STORE, admin_token="x", max_items_per_request=64)))

    async def go() -> list[str]:
        labels: list[str] = []
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as client:
                for i in range(0, len(texts), 64):
                    r = await client.post("/predict/sst2", json={"texts": texts[i : i + 64]})
                    assert r.status_code == 200, r.text
                    labels += [p["label"] for p in r.json()["predictions"]]
        return labels

    labels = asyncio.run(go())
    accuracy = sum(label == e.label for label, e in zip(labels, examples)) / len(examples)
    assert len(examples) == 872 and accuracy >= 0.88, accuracy
