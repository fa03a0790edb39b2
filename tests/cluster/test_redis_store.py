"""Redis store specifics: atomic writes, failures, durability across a crash, key prefixes, seeding
(import_version) and the change events it publishes. Every test runs against a real redis-server."""

from __future__ import annotations

import contextlib
import random
import threading
import time

import pytest

from service.cluster.events import ChangeEvent, EventKind
from service.cluster.redis_store import ImportOutcome, RedisAdapterStore
from service.errors import StoreUnavailable, TaskNotFound
from tests.cluster.conftest import bundle

pytestmark = pytest.mark.cluster

# Reads the active pointer and checks its blob in one atomic step: 1 = both there, -1 = no pointer,
# 0 = a pointer to a missing blob (what must never be observable).
_POINTER_HAS_BLOB = """
local active = redis.call('GET', KEYS[1])
if not active then return -1 end
return redis.call('HEXISTS', ARGV[1] .. active, 'bundle')
"""


def test_a_reader_never_sees_a_pointer_without_its_blob(redis_store, redis_server):
    check = redis_server.client().register_script(_POINTER_HAS_BLOB)
    keys = [redis_store._task_key("sst2", "active")]
    args = [redis_store._task_key("sst2", "v:")]
    blobs = [bundle(seed=s) for s in range(4)]
    stop = threading.Event()
    seen: list[int] = []

    def writer() -> None:
        rng = random.Random(0)
        while not stop.is_set():
            op = rng.random()
            if op < 0.6:
                redis_store.put("sst2", rng.choice(blobs), activate=rng.random() < 0.7)
            elif op < 0.85:
                with contextlib.suppress(TaskNotFound):
                    redis_store.set_active("sst2", rng.choice(redis_store.list_versions("sst2")))
            else:
                with contextlib.suppress(TaskNotFound):
                    redis_store.delete_task("sst2")

    threads = [threading.Thread(target=writer) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            seen.append(check(keys=keys, args=args))
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert 0 not in seen
    assert seen.count(1) > 50 and redis_store.generation() > 50  # the race was really exercised


def test_a_write_redis_refuses_changes_nothing(private_redis):
    store = RedisAdapterStore(private_redis.url, timeout_s=2.0)
    admin = private_redis.client()
    try:
        store.put("sst2", bundle(seed=1))
        generation = store.generation()
        admin.config_set("maxmemory", "1")  # over the limit from now on: Redis refuses writes (OOM)
        with pytest.raises(StoreUnavailable, match="refused.*maxmemory"):
            store.put("sst2", bundle(seed=2))
        with pytest.raises(StoreUnavailable, match="refused"):
            store.set_active("sst2", 1)
        assert store.generation() == generation
        assert store.list_versions("sst2") == [1] and store.get_active("sst2") == 1  # reads still work
        admin.config_set("maxmemory", "0")
        assert store.put("sst2", bundle(seed=3)).version == 2  # no number was burnt by the refused write
    finally:
        store.close()
        admin.close()


def test_redis_down_is_store_unavailable_and_the_store_recovers(private_redis):
    store = RedisAdapterStore(private_redis.url, timeout_s=1.0)
    try:
        data = bundle(seed=1)
        store.put("sst2", data)
        private_redis.stop()
        calls = [store.ping, store.list_tasks, store.generation, lambda: store.get_active("sst2"),
                 lambda: store.get_bytes("sst2", 1), lambda: store.put("sst2", bundle(seed=2)),
                 lambda: store.set_active("sst2", 1), lambda: store.delete_task("sst2")]
        for call in calls:
            started = time.monotonic()
            with pytest.raises(StoreUnavailable, match=r"adapter store \(Redis\) unreachable"):
                call()
            assert time.monotonic() - started < 1.0  # fails fast: callers answer 503 at once
        private_redis.start()
        store.ping()  # the same store object reconnects by itself
        assert store.get_bytes("sst2", store.get_active("sst2")) == data
        assert store.put("sst2", bundle(seed=3)).version == 2
    finally:
        store.close()


def test_acknowledged_writes_survive_a_redis_crash(private_redis):
    store = RedisAdapterStore(private_redis.url)
    try:
        blobs = [bundle(seed=s) for s in range(3)]
        for b in blobs:
            store.put("sst2", b)
        store.set_active("sst2", 2)
        store.put("gone", bundle("gone"))
        store.delete_task("gone")
        generation = store.generation()
        private_redis.restart(crash=True)  # SIGKILL: no shutdown save, only what the AOF holds
        assert store.list_tasks() == ["sst2"]
        assert store.list_versions("sst2") == [1, 2, 3]
        assert store.get_active("sst2") == 2
        assert [store.get_bytes("sst2", v) for v in (1, 2, 3)] == blobs
        assert store.generation() == generation
        assert store.put("gone", bundle("gone")).version == 2  # the reservation survived too
    finally:
        store.close()


def test_key_prefixes_isolate_deployments(redis_server):
    a = RedisAdapterStore(redis_server.url, key_prefix="iso-a:")
    b = RedisAdapterStore(redis_server.url, key_prefix="iso-b:")
    try:
        a.put("sst2", bundle())
        assert b.list_tasks() == [] and b.generation() == 0
        assert a.events_channel == "iso-a:events" != b.events_channel
        assert all(k.startswith(b"iso-a:") for k in redis_server.client().scan_iter(match="iso-*"))
    finally:
        a.close()
        b.close()


def test_import_version_keeps_numbers_and_never_reuses_them(redis_store):
    v1, v3 = bundle(seed=1), bundle(seed=3)
    assert redis_store.import_version("sst2", 1, v1) is ImportOutcome.WRITTEN
    assert redis_store.import_version("sst2", 3, v3) is ImportOutcome.WRITTEN
    assert redis_store.list_versions("sst2") == [1, 3]
    with pytest.raises(TaskNotFound):  # importing never activates
        redis_store.get_active("sst2")
    assert redis_store.import_version("sst2", 3, v3) is ImportOutcome.UNCHANGED
    assert redis_store.import_version("sst2", 3, bundle(seed=9)) is ImportOutcome.CONFLICT
    assert redis_store.import_version("sst2", 2, bundle(seed=2)) is ImportOutcome.RESERVED  # below the last
    assert redis_store.get_bytes("sst2", 3) == v3
    assert redis_store.put("sst2", bundle(seed=4)).version == 4


def test_every_write_publishes_a_change_event_after_it_is_visible(redis_store, redis_server):
    pubsub = redis_server.client().pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(redis_store.events_channel)
    assert pubsub.get_message(timeout=2) is None  # the confirmation (ignored)

    def next_event() -> ChangeEvent:
        message = pubsub.get_message(timeout=2)
        assert message is not None, "no event published"
        return ChangeEvent.decode(message["data"])

    try:
        redis_store.put("sst2", bundle(seed=1))
        redis_store.put("sst2", bundle(seed=2), activate=False)
        redis_store.set_active("sst2", 2)
        redis_store.delete_task("sst2")
        quiet = RedisAdapterStore(redis_store.url, key_prefix=redis_store.key_prefix, announce=False)
        quiet.put("sst2", bundle(seed=3))
        quiet.close()
        redis_store.import_version("sst2", 7, bundle(seed=7))
        events = [next_event() for _ in range(5)]
        assert [(e.kind, e.task, e.version) for e in events] == [
            (EventKind.UPLOADED, "sst2", 1), (EventKind.UPLOADED, "sst2", 2), (EventKind.ACTIVATED, "sst2", 2),
            (EventKind.DELETED, "sst2", None), (EventKind.UPLOADED, "sst2", 7),
        ]
        assert [e.generation for e in events] == [1, 2, 3, 4, 6]  # 5: the unannounced upload
        assert {e.origin for e in events} == {"test"}
        assert pubsub.get_message(timeout=0.2) is None
    finally:
        pubsub.close()
