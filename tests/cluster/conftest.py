"""Cluster fixtures: private redis-server processes (never the shared Redis on 6379), a private SeaweedFS
(S3) and the stores on them.

`redis_server` and `seaweed` are one server each for the whole session; tests isolate themselves with a
fresh key prefix (in Redis and in the bucket). `private_redis` is a server of the test's own, for tests that
stop, crash or restart it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from service.bundles.manifest import BackboneRef
from service.cluster.blob_cache import DiskBlobCache
from service.cluster.redis_store import RedisAdapterStore
from service.cluster.s3_store import S3RedisAdapterStore
from tests.cluster.processes import RedisServer
from tests.cluster.seaweed import SeaweedServer
from tests.conftest import make_bundle, make_manifest

REF = BackboneRef(id="tiny", fingerprint="ab" * 32, model_type="bert", hidden_size=32, num_layers=2)


def bundle(task: str = "sst2", seed: int = 0) -> bytes:
    """Valid bundle bytes for `task` (the store never checks the backbone, so a fake ref will do)."""
    return make_bundle(make_manifest(REF, task=task), seed=seed)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis-shared"))
    try:
        yield server.start()
    finally:
        server.close()


@pytest.fixture
def private_redis(tmp_path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    try:
        yield server.start()
    finally:
        server.close()


@pytest.fixture
def key_prefix() -> str:
    return f"test-{uuid.uuid4().hex[:12]}:"


@pytest.fixture
def redis_store(redis_server, key_prefix) -> Iterator[RedisAdapterStore]:
    store = RedisAdapterStore(redis_server.url, key_prefix=key_prefix, timeout_s=2.0, replica_id="test")
    try:
        yield store
    finally:
        store.close()


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory) -> Iterator[SeaweedServer]:
    server = SeaweedServer(tmp_path_factory.mktemp("seaweed-shared"))
    try:
        yield server.start()
    finally:
        server.close()


@pytest.fixture
def s3_store(redis_server, seaweed, key_prefix, tmp_path) -> Iterator[S3RedisAdapterStore]:
    """Registry in Redis under a fresh key prefix, bytes in the bucket under a prefix of the same name, and a
    disk blob cache of its own."""
    store = S3RedisAdapterStore(redis_server.url, seaweed.bucket_client(prefix=key_prefix.rstrip(":")),
                                cache=DiskBlobCache(tmp_path / "blob-cache", 64 * 1024 * 1024),
                                key_prefix=key_prefix, timeout_s=2.0, replica_id="test")
    try:
        yield store
    finally:
        store.close()
