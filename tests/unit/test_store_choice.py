"""Which store the settings build: the local folder by default, Redis with a URL, Redis + bucket with an S3
endpoint too; an endpoint without Redis is refused with a message saying why. Nothing is contacted: the
clients connect lazily."""

from __future__ import annotations

import pytest

from service.bundles.store import LocalAdapterStore
from service.cluster.redis_store import RedisAdapterStore
from service.cluster.s3_store import S3RedisAdapterStore
from service.errors import ConfigurationError
from service.runtime.runtime import make_store
from service.settings import ServiceSettings

REDIS = "redis://127.0.0.1:1/0"


def settings(tmp_path, **values) -> ServiceSettings:
    return ServiceSettings(_env_file=None, store_dir=tmp_path / "store", blob_cache_dir=tmp_path / "blobs", **values)


def test_the_local_folder_is_the_default(tmp_path):
    assert isinstance(make_store(settings(tmp_path)), LocalAdapterStore)


def test_redis_alone_keeps_bundles_inline(tmp_path):
    store = make_store(settings(tmp_path, redis_url=REDIS))
    assert type(store) is RedisAdapterStore and store.blobs.kind.value == "bundle"


def test_an_s3_endpoint_puts_the_bytes_in_a_bucket_with_a_disk_cache(tmp_path):
    store = make_store(settings(tmp_path, redis_url=REDIS, s3_endpoint="http://127.0.0.1:1", s3_bucket="b-x",
                                s3_prefix="p", s3_access_key_id="AKID", s3_secret_access_key="s3cr3t",
                                blob_cache_bytes=1000))
    assert isinstance(store, S3RedisAdapterStore) and store.blobs.kind.value == "object"
    assert store.bucket.key_for("sst2", "ab" * 32) == f"p/sst2/{'ab' * 32}.safetensors"
    assert store.cache is not None and store.cache.max_bytes == 1000 and store.cache.folder == tmp_path / "blobs"
    assert "s3cr3t" not in repr(store.bucket) and "AKID" not in repr(store.bucket)


def test_no_disk_cache_with_a_zero_budget(tmp_path):
    store = make_store(settings(tmp_path, redis_url=REDIS, s3_endpoint="http://127.0.0.1:1", blob_cache_bytes=0))
    assert isinstance(store, S3RedisAdapterStore) and store.cache is None


def test_an_s3_endpoint_without_redis_is_refused(tmp_path):
    with pytest.raises(ConfigurationError, match="needs ADAPTER_SERVICE_REDIS_URL"):
        make_store(settings(tmp_path, s3_endpoint="http://127.0.0.1:1"))


@pytest.mark.parametrize("values, message", [
    (dict(s3_access_key_id="AKID"), "go together: set both or neither"),
    (dict(s3_secret_access_key="s3cr3t"), "go together: set both or neither"),
    (dict(s3_prefix="bundles/../elsewhere"), r"must not have '\.' or '\.\.' segments"),
])
def test_half_s3_credentials_and_dot_segments_are_refused_at_start(tmp_path, values, message):
    with pytest.raises(ValueError, match=message) as err:
        settings(tmp_path, redis_url=REDIS, s3_endpoint="http://127.0.0.1:1", **values)
    assert "s3cr3t" not in str(err.value) and "AKID" not in str(err.value)
