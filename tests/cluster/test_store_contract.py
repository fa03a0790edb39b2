"""The `AdapterStore` contract, run against every implementation: the local folder, Redis, and Redis with the
bytes in a bucket (a real SeaweedFS) must be interchangeable for the app. Implementation specifics live in test_store_local.py / test_redis_store.py."""

from __future__ import annotations

import hashlib
import threading
from datetime import datetime, timedelta, timezone

import pytest

from service.bundles.codec import read_manifest
from service.bundles.store import AdapterStore, LocalAdapterStore
from service.errors import BundleInvalid, InvalidTaskName, TaskNotFound, VersionNotFound
from tests.cluster.conftest import bundle


@pytest.fixture(params=["local", pytest.param("redis", marks=pytest.mark.cluster),
                        pytest.param("s3", marks=pytest.mark.cluster)])
def any_store(request, tmp_path) -> AdapterStore:
    if request.param == "local":
        return LocalAdapterStore(tmp_path / "store")
    return request.getfixturevalue({"redis": "redis_store", "s3": "s3_store"}[request.param])


def test_is_an_adapter_store(any_store):
    assert isinstance(any_store, AdapterStore)
    any_store.ping()


def test_put_returns_what_get_reads_back(any_store):
    data = bundle(seed=1)
    before = datetime.now(timezone.utc) - timedelta(seconds=5)
    info = any_store.put("sst2", data)
    assert (info.task, info.version, info.size_bytes) == ("sst2", 1, len(data))
    assert info.sha256 == hashlib.sha256(data).hexdigest()
    assert before <= info.stored_at <= datetime.now(timezone.utc) + timedelta(seconds=5)
    assert info.manifest == read_manifest(data)
    assert any_store.get_bytes("sst2", 1) == data
    again = any_store.get_info("sst2", 1)
    assert (again.sha256, again.size_bytes, again.manifest) == (info.sha256, info.size_bytes, info.manifest)
    assert abs((again.stored_at - info.stored_at).total_seconds()) < 5


def test_versions_count_up_and_the_newest_is_activated(any_store):
    blobs = [bundle(seed=s) for s in (1, 2, 3)]
    assert [any_store.put("sst2", b).version for b in blobs] == [1, 2, 3]
    assert any_store.list_versions("sst2") == [1, 2, 3]
    assert any_store.get_active("sst2") == 3
    assert [any_store.get_bytes("sst2", v) for v in (1, 2, 3)] == blobs


def test_put_without_activate_leaves_the_pointer(any_store):
    any_store.put("sst2", bundle(seed=1))
    assert any_store.put("sst2", bundle(seed=2), activate=False).version == 2
    assert any_store.get_active("sst2") == 1
    any_store.put("fresh", bundle("fresh"), activate=False)
    assert any_store.list_versions("fresh") == [1]
    with pytest.raises(TaskNotFound):  # stored, but nothing is live yet
        any_store.get_active("fresh")


def test_rollback_and_roll_forward_move_only_the_pointer(any_store):
    for s in (1, 2, 3):
        any_store.put("sst2", bundle(seed=s))
    any_store.set_active("sst2", 1)
    assert any_store.get_active("sst2") == 1
    assert any_store.list_versions("sst2") == [1, 2, 3]
    any_store.set_active("sst2", 3)
    assert any_store.get_active("sst2") == 3
    with pytest.raises(VersionNotFound):
        any_store.set_active("sst2", 9)
    with pytest.raises(TaskNotFound):
        any_store.set_active("nope", 1)
    assert any_store.get_active("sst2") == 3


def test_delete_removes_everything_but_reserves_the_numbers(any_store):
    any_store.put("sst2", bundle(seed=1))
    any_store.put("sst2", bundle(seed=2))
    any_store.put("keep", bundle("keep"))
    any_store.delete_task("sst2")
    assert any_store.list_tasks() == ["keep"]
    for read in (lambda: any_store.get_active("sst2"), lambda: any_store.list_versions("sst2"),
                 lambda: any_store.get_bytes("sst2", 1), lambda: any_store.get_info("sst2", 2)):
        with pytest.raises(TaskNotFound):
            read()
    with pytest.raises(TaskNotFound):
        any_store.delete_task("sst2")
    assert any_store.put("sst2", bundle(seed=3)).version == 3  # 1 and 2 named other bundles: never reused
    assert any_store.list_versions("sst2") == [3]
    assert any_store.get_active("sst2") == 3
    assert any_store.get_active("keep") == 1


def test_unknown_task_and_version(any_store):
    any_store.put("sst2", bundle())
    for read in (any_store.get_bytes, any_store.get_info):
        with pytest.raises(VersionNotFound):
            read("sst2", 7)
        with pytest.raises(TaskNotFound):
            read("nope", 1)
    with pytest.raises(TaskNotFound):
        any_store.list_versions("nope")
    with pytest.raises(TaskNotFound):
        any_store.get_active("nope")


def test_list_tasks_is_sorted(any_store):
    assert any_store.list_tasks() == []
    for task in ("zeta", "alpha", "mid-1"):
        any_store.put(task, bundle(task))
    assert any_store.list_tasks() == ["alpha", "mid-1", "zeta"]


def test_generation_counts_writes_only(any_store):
    g0 = any_store.generation()
    any_store.put("sst2", bundle(seed=1))
    g1 = any_store.generation()
    any_store.put("sst2", bundle(seed=2), activate=False)
    g2 = any_store.generation()
    any_store.set_active("sst2", 2)
    g3 = any_store.generation()
    any_store.put("keep", bundle("keep"))
    g4 = any_store.generation()
    any_store.delete_task("sst2")
    g5 = any_store.generation()
    assert g0 < g1 < g2 < g3 < g4 < g5
    # reads and refused writes leave it alone
    any_store.list_tasks()
    any_store.get_bytes("keep", 1)
    with pytest.raises(VersionNotFound):
        any_store.set_active("keep", 5)
    with pytest.raises(BundleInvalid):
        any_store.put("keep", b"not a bundle at all")
    with pytest.raises(TaskNotFound):
        any_store.delete_task("sst2")
    assert any_store.generation() == g5


def test_put_refuses_a_bundle_for_another_task(any_store):
    with pytest.raises(BundleInvalid) as err:
        any_store.put("sst2", bundle("other"))
    assert err.value.code == "task_mismatch"
    with pytest.raises(BundleInvalid) as err:
        any_store.put("sst2", b"\x80\x04pickle")
    assert err.value.code == "not_safetensors"
    assert any_store.list_tasks() == []


BAD_NAMES = ["../escape", "a/b", "..", "", "UPPER", "x" * 65, "sp ace", "-lead", "a:b", "a*"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_task_names_are_validated_everywhere(any_store, name):
    calls = [
        lambda: any_store.put(name, bundle()),
        lambda: any_store.get_bytes(name, 1),
        lambda: any_store.get_info(name, 1),
        lambda: any_store.list_versions(name),
        lambda: any_store.get_active(name),
        lambda: any_store.set_active(name, 1),
        lambda: any_store.delete_task(name),
    ]
    for call in calls:
        with pytest.raises(InvalidTaskName):
            call()


def test_concurrent_uploads_get_distinct_versions(any_store):
    results: list[int] = []
    lock = threading.Lock()

    def upload(worker: int) -> None:
        for i in range(4):
            v = any_store.put("sst2", bundle(seed=10 * worker + i)).version
            with lock:
                results.append(v)

    threads = [threading.Thread(target=upload, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(results) == list(range(1, 17))
    assert any_store.list_versions("sst2") == list(range(1, 17))
    assert any_store.get_active("sst2") in results
