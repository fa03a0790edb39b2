"""`adapter-service store sync`: seeding Redis from a local store folder, idempotently, without ever
overwriting a different bundle or (by default) a pointer the cluster has moved."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from service.bundles.store import LocalAdapterStore
from service.cli import app
from service.cluster.redis_store import ImportOutcome
from service.cluster.seed import ActiveAction, seed_redis
from tests.cluster.conftest import bundle

pytestmark = pytest.mark.cluster


@pytest.fixture
def local(tmp_path) -> LocalAdapterStore:
    store = LocalAdapterStore(tmp_path / "adapters_store")
    for seed in (1, 2, 3):
        store.put("sst2", bundle(seed=seed))
    store.set_active("sst2", 2)
    store.put("news", bundle("news"))
    store.put("draft", bundle("draft"), activate=False)
    return store


def sync(local, redis_store, *args: str):
    argv = ["store", "sync", str(local.root), "--redis-url", redis_store.url, "--key-prefix", redis_store.key_prefix]
    return CliRunner().invoke(app, [*argv, *args])


def test_sync_copies_versions_and_pointers_and_is_idempotent(local, redis_store):
    result = sync(local, redis_store)
    assert result.exit_code == 0, result.output
    assert "sst2: copied v1 v2 v3; active v2 (set)" in result.output
    assert "draft: copied v1; no active version" in result.output
    assert "3 task(s) synced" in result.output
    assert redis_store.list_tasks() == ["draft", "news", "sst2"]
    for task in local.list_tasks():
        assert redis_store.list_versions(task) == local.list_versions(task)
        for v in local.list_versions(task):
            assert redis_store.get_info(task, v).sha256 == local.get_info(task, v).sha256
    assert (redis_store.get_active("sst2"), redis_store.get_active("news")) == (2, 1)
    generation = redis_store.generation()

    again = sync(local, redis_store)
    assert again.exit_code == 0, again.output
    assert "sst2: unchanged v1 v2 v3; active v2 (already)" in again.output
    assert redis_store.generation() == generation  # nothing was written the second time
    assert redis_store.put("sst2", bundle(seed=4)).version == 4  # the cluster goes on numbering


def test_sync_keeps_what_the_cluster_changed_unless_told(local, redis_store):
    seed_redis(local, redis_store)
    redis_store.set_active("sst2", 3)  # a rollforward through the cluster after seeding
    reports = {r.task: r for r in seed_redis(local, redis_store)}
    assert reports["sst2"].action is ActiveAction.KEPT and redis_store.get_active("sst2") == 3
    reports = {r.task: r for r in seed_redis(local, redis_store, overwrite_active=True)}
    assert reports["sst2"].action is ActiveAction.SET and redis_store.get_active("sst2") == 2


def test_a_conflicting_version_is_left_alone_and_fails_the_command(local, redis_store):
    redis_store.put("sst2", bundle(seed=99))  # Redis already has another sst2@1
    result = sync(local, redis_store)
    assert result.exit_code == 1
    assert "sst2: copied v2 v3, CONFLICT (other bytes in Redis) v1" in result.output
    assert "conflicts in: sst2" in result.output
    assert redis_store.get_info("sst2", 1).sha256 != local.get_info("sst2", 1).sha256
    assert "active kept at v1 (source: v2" in result.output  # Redis's own pointer is left alone too
    assert redis_store.get_active("sst2") == 1


def test_deleted_numbers_are_not_brought_back(local, redis_store):
    seed_redis(local, redis_store)
    redis_store.delete_task("news")
    reports = {r.task: r for r in seed_redis(local, redis_store)}
    assert reports["news"].versions == {ImportOutcome.RESERVED: [1]}
    assert reports["news"].action is ActiveAction.UNAVAILABLE
    assert "news" not in redis_store.list_tasks()


def test_unreachable_redis_is_a_clear_error(local, tmp_path):
    from tests.cluster.processes import free_port

    url = f"redis://127.0.0.1:{free_port()}/0"
    result = CliRunner().invoke(app, ["store", "sync", str(local.root), "--redis-url", url, "--timeout", "0.5"])
    assert result.exit_code == 1
    assert "store sync failed: adapter store (Redis) unreachable" in result.output
