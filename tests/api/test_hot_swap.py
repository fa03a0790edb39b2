"""Hot swap under concurrent load: no failed request, and every response was produced by exactly the weights
of the version it reports (never a mix of two versions)."""

from __future__ import annotations

import asyncio

import pytest

from service.bundles.codec import encode_bundle
from service.bundles.manifest import AdapterConfig, HeadType
from tests.api.conftest import AUTH
from tests.conftest import make_manifest
from tests.synthetic import random_tensors

pytestmark = pytest.mark.anyio

TEXT = "the quick brown fox jumps over the lazy dog"


def version_bundle(ref, k: int) -> bytes:
    """A regression bundle whose output depends on its adapter AND head weights (different for each k)."""
    m = make_manifest(ref, task="swap", head_type=HeadType.REGRESSION, adapter=AdapterConfig(bottleneck=8))
    t = random_tensors(m, seed=100 + k, std=0.3)
    t["head.out.bias"].fill_(10.0 * k)
    return encode_bundle(m, t)


async def test_hot_swap_under_load_never_mixes_versions(client):
    svc = client.app.state.svc
    ref = svc.engine.backbone.ref
    svc.store.put("swap", version_bundle(ref, 1))
    svc.registry.refresh("swap")
    uploads = 6
    seen: list[tuple[int, float]] = []
    failures: list[str] = []
    done = asyncio.Event()

    async def load(i: int):
        task_cycle = ["swap", "sentiment", "swap", "ner"]
        n = 0
        while not done.is_set():
            task = task_cycle[(i + n) % len(task_cycle)]
            body = {"text": TEXT} if task != "swap" else {"texts": [TEXT, TEXT + " again"]}
            r = await client.post(f"/predict/{task}", json=body)
            n += 1
            if r.status_code != 200:
                failures.append(f"{task}: {r.status_code} {r.text}")
            elif task == "swap":
                seen.append((r.json()["version"], r.json()["predictions"][0]["value"]))

    workers = [asyncio.create_task(load(i)) for i in range(8)]
    await asyncio.sleep(0.05)
    for k in range(2, uploads + 1):
        r = await client.post("/adapters", files={"file": ("b", version_bundle(ref, k))}, headers=AUTH)
        assert r.status_code == 201 and r.json()["version"] == k
        await asyncio.sleep(0.05)
    done.set()
    await asyncio.gather(*workers)

    assert failures == []
    versions = {v for v, _ in seen}
    assert len(versions) >= 3, f"traffic saw too few versions: {versions}"
    expected = {k: svc.engine.predict("swap", [TEXT], version=k)[1][0]["value"] for k in range(1, uploads + 1)}
    assert len({round(v, 3) for v in expected.values()}) == uploads  # versions really differ
    for version, value in seen:
        assert value == pytest.approx(expected[version], abs=1e-4), (version, value)
    # after the last upload everything serves the last version
    r = await client.post("/predict/swap", json={"text": TEXT})
    assert r.json()["version"] == uploads
