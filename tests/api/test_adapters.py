"""Management API, auth, health, metrics and OpenAPI."""

from __future__ import annotations

import json

import pytest
import torch

from service.api.keys import KeyRing
from service.bundles.codec import encode_bundle
from service.bundles.manifest import AdapterConfig, HeadType
from service.errors import StoreUnavailable
from tests.api.conftest import AUTH
from tests.conftest import make_bundle, make_manifest
from tests.synthetic import random_tensors

pytestmark = pytest.mark.anyio


def bundle_for(client, task="sentiment", seed=7, **kw) -> bytes:
    ref = client.app.state.svc.engine.backbone.ref
    return make_bundle(make_manifest(ref, task=task, adapter=AdapterConfig(bottleneck=8), **kw), seed=seed)


async def upload(client, data: bytes, headers=AUTH):
    return await client.post("/adapters", files={"file": ("bundle.safetensors", data)}, headers=headers)


def store_state(client) -> dict:
    store = client.app.state.svc.store
    return {t: (store.list_versions(t), store.get_active(t)) for t in store.list_tasks()} | {
        "_files": sorted(str(p.relative_to(store.root)) for p in store.root.rglob("*") if p.is_file())
    }


async def test_upload_goes_live_and_versions_roll_back_and_forward(client):
    before = (await client.post("/predict/sentiment", json={"text": "x"})).json()
    r = await upload(client, bundle_for(client))
    assert r.status_code == 201, r.text
    body = r.json()
    assert body == {"task": "sentiment", "version": 2, "sha256": body["sha256"], "active": True,
                    "head_type": "classification", "labels": ["negative", "positive"], "size_bytes": body["size_bytes"]}
    after = (await client.post("/predict/sentiment", json={"text": "x"})).json()
    assert after["version"] == 2 and after["predictions"] != before["predictions"]
    r = await client.put("/adapters/sentiment/active", json={"version": 1}, headers=AUTH)
    assert r.status_code == 200 and r.json()["active_version"] == 1
    assert (await client.post("/predict/sentiment", json={"text": "x"})).json() == before
    r = await client.put("/adapters/sentiment/active", json={"version": 2}, headers=AUTH)
    assert (await client.post("/predict/sentiment", json={"text": "x"})).json() == after
    r = await client.put("/adapters/sentiment/active", json={"version": 9}, headers=AUTH)
    assert r.status_code == 404 and "no version 9" in r.json()["detail"]
    r = await client.put("/adapters/sentiment/active", json={"version": 0}, headers=AUTH)
    assert r.status_code == 422


async def test_new_task_upload_then_delete(client):
    r = await upload(client, bundle_for(client, task="brand-new"))
    assert r.status_code == 201 and r.json()["version"] == 1
    assert (await client.post("/predict/brand-new", json={"text": "x"})).status_code == 200
    assert (await client.delete("/adapters/brand-new", headers=AUTH)).status_code == 204
    r = await client.post("/predict/brand-new", json={"text": "x"})
    assert r.status_code == 404
    assert (await client.delete("/adapters/brand-new", headers=AUTH)).status_code == 404
    assert (await upload(client, bundle_for(client, task="brand-new"))).json()["version"] == 2  # never reused


def _bad_bundles(client) -> dict[str, tuple[bytes, str]]:
    from safetensors.torch import save as st_save

    ref = client.app.state.svc.engine.backbone.ref
    m = make_manifest(ref, task="sentiment", adapter=AdapterConfig(bottleneck=8))
    t = random_tensors(m, seed=1)
    nan = {k: v.clone() for k, v in t.items()}
    nan["head.out.bias"][0] = float("nan")
    wrong_fp = m.model_copy(update={"backbone": ref.model_copy(update={"fingerprint": "f" * 64})})
    extra = {**t, "adapter.0.attn.extra": torch.zeros(2)}
    meta = {"manifest": m.model_dump_json()}
    return {
        "garbage": (b"definitely not a bundle" * 10, "safetensors"),
        "nan": (st_save(nan, metadata=meta), "nan"),
        "fingerprint": (encode_bundle(wrong_fp, t), "fingerprint"),
        "extra": (st_save(extra, metadata=meta), "unexpected tensor"),
        "headtype": (st_save(t, metadata={"manifest": json.dumps({**json.loads(m.model_dump_json()),
                                                                    "head_type": "poetry"})}), "poetry"),
    }


@pytest.mark.parametrize("case", ["garbage", "nan", "fingerprint", "extra", "headtype"])
async def test_invalid_upload_is_422_and_changes_nothing(client, case):
    data, words = _bad_bundles(client)[case]
    state = store_state(client)
    before = (await client.post("/predict/sentiment", json={"text": "x"})).json()
    r = await upload(client, data)
    assert r.status_code == 422 and words in r.json()["detail"].lower()
    assert store_state(client) == state
    assert (await client.post("/predict/sentiment", json={"text": "x"})).json() == before


async def test_upload_over_the_size_limit_is_413_and_changes_nothing(client):
    state = store_state(client)
    big = b"\0" * (3 * 1024 * 1024)
    r = await upload(client, big)
    assert r.status_code == 413 and "over the limit" in r.json()["detail"]
    assert store_state(client) == state


async def test_upload_without_a_file_field_is_422(client):
    r = await client.post("/adapters", files={"nope": ("x.bin", b"1")}, headers=AUTH)
    assert r.status_code == 422 and "file" in r.json()["detail"]
    r = await client.post("/adapters", data={"nope": "1"}, headers=AUTH)  # a form that cannot carry a file
    assert r.status_code == 415 and "multipart/form-data" in r.json()["detail"]


@pytest.mark.parametrize(
    "method, path, kw",
    [
        ("post", "/adapters", {"files": {"file": ("b", b"x")}}),
        ("delete", "/adapters/sentiment", {}),
        ("put", "/adapters/sentiment/active", {"json": {"version": 1}}),
    ],
)
async def test_management_needs_the_admin_token(client, method, path, kw):
    r = await getattr(client, method)(path, **kw)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    r = await getattr(client, method)(path, headers={"Authorization": "Bearer wrong"}, **kw)
    assert r.status_code == 403 and "invalid admin token" in r.json()["detail"]
    r = await getattr(client, method)(path, headers={"Authorization": "Basic abc"}, **kw)
    assert r.status_code == 401
    assert "test-admin-token" not in r.text


async def test_list_and_detail(client):
    await upload(client, bundle_for(client))
    listing = (await client.get("/adapters")).json()["adapters"]
    assert [a["task"] for a in listing] == ["ner", "sentiment", "similarity", "squad", "topics"]
    s = next(a for a in listing if a["task"] == "sentiment")
    assert s["active_version"] == 2 and s["versions"] == [1, 2] and s["head_type"] == "classification"
    assert s["resident"] is True and s["size_bytes"] > 0
    detail = (await client.get("/adapters/sentiment")).json()
    assert [v["version"] for v in detail["versions"]] == [1, 2]
    assert [v["active"] for v in detail["versions"]] == [False, True]
    m = detail["versions"][1]["manifest"]
    assert m["adapter"]["bottleneck"] == 8 and m["backbone"]["hidden_size"] == 32 and "metrics" in m
    assert (await client.get("/adapters/unknown")).status_code == 404


async def test_versions_report_active_false_once_another_is_active(client, monkeypatch):
    """`active` is the real pointer: false for every version but the active one, in the detail after a
    rollback and in an upload's answer when another write moved the pointer before the answer."""
    assert (await upload(client, bundle_for(client))).json()["active"] is True
    r = await client.put("/adapters/sentiment/active", json={"version": 1}, headers=AUTH)
    assert r.status_code == 200 and r.json()["active_version"] == 1
    detail = (await client.get("/adapters/sentiment")).json()
    assert detail["active_version"] == 1
    assert [(v["version"], v["active"]) for v in detail["versions"]] == [(1, True), (2, False)]

    store = client.app.state.svc.store
    put = store.put

    def put_then_rolled_back(task, data, **kw):  # another replica rolls back right after this write
        info = put(task, data, **kw)
        store.set_active(task, 1)
        return info

    monkeypatch.setattr(store, "put", put_then_rolled_back)
    r = await upload(client, bundle_for(client, seed=8))
    assert r.status_code == 201, r.text
    assert r.json()["version"] == 3 and r.json()["active"] is False
    detail = (await client.get("/adapters/sentiment")).json()
    assert [(v["version"], v["active"]) for v in detail["versions"]] == [(1, True), (2, False), (3, False)]


async def test_health_ready_and_metrics(client):
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"]["store"] == "ok"
    await client.post("/predict/sentiment", json={"text": "x"})
    await client.post("/predict/nope", json={"text": "x"})
    text = (await client.get("/metrics")).text
    assert 'adapter_service_requests_total{status="200",task="sentiment"} 1.0' in text
    assert 'adapter_service_requests_total{status="404",task="_unknown"} 1.0' in text
    for name in ("adapter_service_request_seconds_bucket", "adapter_service_batch_size_bucket",
                 "adapter_service_batch_tokens_bucket", "adapter_service_queue_depth",
                 "adapter_service_cache_hits_total", "adapter_service_cache_misses_total",
                 "adapter_service_cache_evictions_total", "adapter_service_cache_resident_bytes",
                 "adapter_service_adapter_load_seconds_bucket"):
        assert name in text, name


async def test_readyz_reports_an_unreachable_store(client, monkeypatch):
    def down():
        raise StoreUnavailable("adapter store (Redis) unreachable: connection refused")

    monkeypatch.setattr(client.app.state.svc.store, "ping", down)
    r = await client.get("/readyz")
    assert r.status_code == 503 and "store adapter store (Redis) unreachable" in r.json()["detail"]
    # a load balancer's probe keeps a replica that can still serve its resident tasks in rotation
    r = await client.get("/readyz", params={"allow_degraded": "true"})
    assert r.status_code == 200 and r.json()["status"] == "degraded"
    assert "unreachable" in r.json()["checks"]["store"]


async def test_readyz_answers_in_time_when_the_store_hangs(client, monkeypatch):
    """A store that does not answer (a blackholed bucket) is a failed check within STORE_CHECK_S, so a
    probe with a 3 s timeout gets an answer, and with allow_degraded keeps the replica in rotation."""
    import time

    from service.api import routes_health

    monkeypatch.setattr(routes_health, "STORE_CHECK_S", 0.2)
    monkeypatch.setattr(client.app.state.svc.store, "ping", lambda: time.sleep(1.0))
    t0 = time.perf_counter()
    r = await client.get("/readyz", params={"allow_degraded": "true"})
    assert time.perf_counter() - t0 < 0.9
    assert r.status_code == 200 and r.json()["status"] == "degraded"
    assert r.json()["checks"]["store"] == "no answer within 0.2 s"
    r = await client.get("/readyz")
    assert r.status_code == 503 and "store no answer within 0.2 s" in r.json()["detail"]


async def test_predict_api_key_when_configured(client):
    client.app.state.svc.keys = KeyRing(None, all_tasks_key="reader-key")
    assert (await client.post("/predict/sentiment", json={"text": "x"})).status_code == 401
    r = await client.post("/predict/sentiment", json={"text": "x"}, headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401 and r.json()["detail"] == "unknown API key"
    r = await client.post("/predict/sentiment", json={"text": "x"}, headers={"Authorization": "Bearer reader-key"})
    assert r.status_code == 200
    assert (await client.get("/healthz")).status_code == 200  # probes stay open


async def test_openapi_documents_every_body_shape(client):
    spec = (await client.get("/openapi.json")).json()
    examples = spec["paths"]["/predict/{task}"]["post"]["requestBody"]["content"]["application/json"]["examples"]
    assert set(examples) == {"text", "text_pair", "texts", "text_pairs", "question", "questions"}
    assert "multipart/form-data" in spec["paths"]["/adapters"]["post"]["requestBody"]["content"]
    assert (await client.get("/docs")).status_code == 200


@pytest.mark.parametrize("head", [HeadType.TOKEN_CLASSIFICATION, HeadType.QA, HeadType.MULTILABEL])
async def test_upload_every_head_type(client, head):
    r = await upload(client, bundle_for(client, task=f"new-{head.value}", head_type=head))
    assert r.status_code == 201 and r.json()["head_type"] == head.value


async def test_an_upload_stored_durably_is_acknowledged_even_if_the_refresh_fails(client, monkeypatch):
    svc = client.app.state.svc

    def store_gone(task):
        raise StoreUnavailable("adapter store (Redis) unreachable: connection refused")

    monkeypatch.setattr(svc.registry, "refresh", store_gone)
    r = await upload(client, bundle_for(client))
    assert r.status_code == 201 and r.json()["version"] == 2  # durable in the store: acknowledged, not 503
    assert r.json()["active"] is True
    assert svc.store.get_active("sentiment") == 2
