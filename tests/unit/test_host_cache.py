"""The host-memory LRU of decoded bundles: bounded by bytes, least recently used out, per-task forgetting;
and a task evicted from a small device cache reloads from it without reading the store again."""

from __future__ import annotations

from service.bundles.codec import decode_bundle
from service.runtime.engine import Engine
from service.runtime.host_cache import HostBundleCache
from tests.conftest import make_bundle, make_manifest


def test_lru_by_bytes_and_forget(tiny_backbone):
    data = {(f"t{i}", v): make_bundle(make_manifest(tiny_backbone.ref, task=f"t{i}"), seed=i * 10 + v)
            for i in range(4) for v in (1, 2)}
    loads: list[tuple[str, int]] = []

    def load(task, version):
        loads.append((task, version))
        return decode_bundle(data[(task, version)], backbone=tiny_backbone.ref, max_bytes=1 << 30)

    one = load("t0", 1)
    size = sum(t.numel() * t.element_size() for t in one.tensors.values())
    loads.clear()
    cache = HostBundleCache(load, max_bytes=2 * size)
    a = cache.get("t0", 1)
    assert cache.get("t0", 1) is a and loads == [("t0", 1)] and cache.hits == 1
    cache.get("t1", 1)
    cache.get("t0", 1)  # t0 most recent
    cache.get("t2", 1)  # evicts t1
    assert cache.resident_bytes <= 2 * size
    cache.get("t0", 1)
    cache.get("t1", 1)
    assert loads == [("t0", 1), ("t1", 1), ("t2", 1), ("t1", 1)]
    cache.put(("t3", 2), load("t3", 2))
    cache.forget("t3", keep_version=2)
    cache.get("t3", 2)
    assert loads[-1] == ("t3", 2) and len(loads) == 5  # kept
    cache.forget("t3")
    cache.get("t3", 2)
    assert len(loads) == 6  # forgotten: loaded again


def test_a_device_evicted_task_reloads_without_the_store(tiny_backbone, store):
    for i in range(3):
        store.put(f"t{i}", make_bundle(make_manifest(tiny_backbone.ref, task=f"t{i}"), seed=i))
    reads: list[tuple[str, int]] = []
    get_bytes = store.get_bytes
    store.get_bytes = lambda task, version: reads.append((task, version)) or get_bytes(task, version)
    engine = Engine(tiny_backbone, store, cache_max_slots=1)
    manifest = store.get_info("t0", 1).manifest
    rows = engine.encode(manifest, ["hello there"])
    first = {t: engine.run(engine.requests(t, 1, manifest, rows))[0].prediction for t in ("t0", "t1", "t2")}
    again = {t: engine.run(engine.requests(t, 1, manifest, rows))[0].prediction for t in ("t0", "t1", "t2")}
    assert first == again
    assert engine.cache.stats.evictions >= 4  # one slot: every switch evicted
    assert sorted(reads) == [("t0", 1), ("t1", 1), ("t2", 1)]  # each read from the store once
