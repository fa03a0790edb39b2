"""API fixtures: the app on a tiny backbone with one task per head type, driven through its ASGI interface."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from service.api.app import create_app
from service.bundles.manifest import AdapterConfig, HeadType
from service.runtime.runtime import Runtime
from service.settings import ServiceSettings
from tests.conftest import make_bundle, make_manifest
from tests.procs import ServerProcess

ADMIN = "test-admin-token"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
TASKS = {
    "sentiment": HeadType.CLASSIFICATION,
    "topics": HeadType.MULTILABEL,
    "similarity": HeadType.REGRESSION,
    "ner": HeadType.TOKEN_CLASSIFICATION,
    "squad": HeadType.QA,
}


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
def seeded_store(tiny_backbone, store):
    for i, (task, head) in enumerate(TASKS.items()):
        store.put(task, make_bundle(make_manifest(tiny_backbone.ref, task=task, head_type=head,
                                                  adapter=AdapterConfig(bottleneck=8)), seed=i))
    return store


@pytest.fixture
def settings() -> ServiceSettings:
    # Two forward workers (the CPU default); the app leaves the process's torch threads alone (the serve
    # command sets them).
    return ServiceSettings(admin_token=ADMIN, max_wait_ms=2, max_items_per_request=8, max_text_chars=500,
                           upload_max_bytes=2 * 1024 * 1024, forward_workers=2)


@pytest.fixture
async def client(tiny_backbone, seeded_store, settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(Runtime(settings, backbone=tiny_backbone, store=seeded_store))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            c.app = app
            yield c


@contextlib.contextmanager
def tiny_server(model_dir: Path, store_root: Path, log: Path, **settings: str) -> Iterator[ServerProcess]:
    """A ready `adapter-service serve` process on the tiny BERT at `model_dir` and the store at `store_root`
    (the ADMIN token, CPU; `settings`: more ADAPTER_SERVICE_* variables), stopped when the block ends."""
    proc = ServerProcess(
        {"ADAPTER_SERVICE_BACKBONE": str(model_dir), "ADAPTER_SERVICE_STORE_DIR": str(store_root),
         "ADAPTER_SERVICE_ADMIN_TOKEN": ADMIN, "ADAPTER_SERVICE_DEVICE": "cpu", **settings},
        log,
    ).start()
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


@pytest.fixture
def server(tmp_path, tiny_model_dirs, tiny_backbone, seeded_store):
    """A real `adapter-service serve` process on the tiny BERT and the seeded store (the ADMIN token)."""
    with tiny_server(tiny_model_dirs["bert"], seeded_store.root, tmp_path / "server.log") as proc:
        yield proc
