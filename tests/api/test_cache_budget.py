"""A small device cache through the API: uploads wait for a slot instead of failing, and a budget that
can hold no adapter is refused at start-up."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from service.api.app import create_app
from service.bundles.manifest import AdapterConfig
from service.errors import ConfigurationError
from service.runtime.runtime import Runtime
from tests.api.conftest import AUTH, TASKS
from tests.conftest import make_bundle, make_manifest

pytestmark = pytest.mark.anyio


async def test_an_upload_while_every_slot_is_pinned_waits_and_succeeds(tiny_backbone, seeded_store, settings):
    settings = settings.model_copy(update={"cache_max_slots": 2, "cache_wait_s": 10.0})
    app = create_app(Runtime(settings, backbone=tiny_backbone, store=seeded_store))
    async with app.router.lifespan_context(app):
        engine = app.state.svc.engine
        pins = [engine.cache.acquire("sentiment", 1), engine.cache.acquire("topics", 1)]  # every slot in use
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            data = make_bundle(make_manifest(tiny_backbone.ref, task="newtask", adapter=AdapterConfig(bottleneck=8)))
            upload = asyncio.create_task(c.post("/adapters", files={"file": ("b.safetensors", data)}, headers=AUTH))
            await asyncio.sleep(0.3)
            assert not upload.done()  # its smoke test waits for a slot
            for entry in pins:
                engine.cache.release(entry)
            r = await upload
            assert r.status_code == 201, r.text
            assert engine.cache.stats.slot_waits >= 1 and engine.cache.stats.slot_wait_timeouts == 0
            pred = await c.post("/predict/newtask", json={"text": "hello"})
            assert pred.status_code == 200, pred.text
            metrics = (await c.get("/metrics")).text
            assert "adapter_service_cache_slot_waits_total" in metrics
            assert "adapter_service_rows_waiting_for_slot" in metrics


async def test_predicts_over_more_tasks_than_slots_all_succeed(tiny_backbone, seeded_store, settings):
    settings = settings.model_copy(update={"cache_max_slots": 2})
    app = create_app(Runtime(settings, backbone=tiny_backbone, store=seeded_store))
    bodies = {"sentiment": {"text": "x"}, "topics": {"text": "x"}, "similarity": {"text": "a", "text_pair": "b"},
              "ner": {"text": "Ada lives in Paris"}, "squad": {"question": "who?", "context": "Ada did."}}
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        rs = await asyncio.gather(*(c.post(f"/predict/{t}", json=bodies[t]) for t in list(TASKS) * 6))
    assert [r.status_code for r in rs] == [200] * len(rs), [r.text for r in rs if r.status_code != 200]


async def test_an_upload_larger_than_the_whole_cache_is_refused_with_a_reason(client):
    ref = client.app.state.svc.engine.backbone.ref
    data = make_bundle(make_manifest(ref, task="huge", adapter=AdapterConfig(bottleneck=1024)))  # ~1 MB
    engine = client.app.state.svc.engine
    engine.cache.max_bytes = 512 * 1024  # below the settings' 1 MiB floor, so that the bundle fits the upload limit
    before = client.app.state.svc.store.list_tasks()
    r = await client.post("/adapters", files={"file": ("b.safetensors", data)}, headers=AUTH)
    assert r.status_code == 422 and "more than the whole adapter cache" in r.json()["detail"]
    assert client.app.state.svc.store.list_tasks() == before


async def test_a_cache_that_holds_no_stored_task_is_refused_at_start_up(tiny_backbone, seeded_store, settings):
    big = make_manifest(tiny_backbone.ref, task="big", adapter=AdapterConfig(bottleneck=4096))
    seeded_store.put("big", make_bundle(big))
    settings = settings.model_copy(update={"cache_max_bytes": 1024 * 1024})
    app = create_app(Runtime(settings, backbone=tiny_backbone, store=seeded_store))
    with pytest.raises(ConfigurationError, match=r"cannot hold task 'big', which needs \d+ bytes"):
        async with app.router.lifespan_context(app):
            pass
