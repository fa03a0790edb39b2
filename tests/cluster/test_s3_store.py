"""Redis registry + S3 bytes (`S3RedisAdapterStore`) on a real SeaweedFS and redis-server: where the bytes
go, the local blob cache, checksums, garbage collection, migration from Redis-held bytes, an unreachable
bucket, and the `store gc` / `store migrate` commands. The AdapterStore contract itself is in
test_store_contract.py."""

from __future__ import annotations

import hashlib
import re
from datetime import datetime, timedelta, timezone
from io import BytesIO

import pytest
from typer.testing import CliRunner

from service.cli import app
from service.cluster.blob_cache import DiskBlobCache
from service.cluster.blobs import BlobKind
from service.cluster.gc import collect_garbage
from service.cluster.migrate import migrate_to_bucket
from service.cluster.object_store import ObjectNotFound, S3Bucket
from service.cluster.redis_store import ImportOutcome, RedisAdapterStore
from service.cluster.s3_store import MoveOutcome, S3RedisAdapterStore
from service.errors import StoreUnavailable
from tests.cluster.conftest import bundle
from tests.cluster.processes import free_port
from tests.cluster.seaweed import ACCESS_KEY, SECRET_KEY

pytestmark = pytest.mark.cluster


def test_bytes_go_to_the_bucket_under_content_addressed_keys_and_redis_keeps_none(s3_store):
    data = bundle(seed=1)
    info = s3_store.put("sst2", data)
    key = f"{s3_store.bucket.prefix}/sst2/{info.sha256}.safetensors"
    assert s3_store.bucket.exists(key)
    entry = s3_store.client.hgetall(s3_store._version_key("sst2", 1))
    assert entry[b"object"] == key.encode() and b"bundle" not in entry
    assert s3_store.client.memory_usage(s3_store._version_key("sst2", 1)) < 4096  # metadata only
    assert s3_store.refs.referenced() == {key: 1}
    assert s3_store.bucket.get(key, info.sha256) == data


def test_reads_come_from_the_disk_cache_after_a_restart_and_a_corrupt_file_is_refetched(s3_store, tmp_path):
    data = bundle(seed=2)
    sha = s3_store.put("sst2", data).sha256
    folder = tmp_path / "restarted-cache"
    unreachable = S3Bucket(endpoint=f"http://127.0.0.1:{free_port()}", bucket=s3_store.bucket.bucket,
                           prefix=s3_store.bucket.prefix, access_key_id=ACCESS_KEY, secret_access_key=SECRET_KEY,
                           timeout_s=0.5)

    def replica(bucket: S3Bucket) -> S3RedisAdapterStore:  # a replica (re)started on the same cache folder
        return S3RedisAdapterStore(s3_store.url, bucket, cache=DiskBlobCache(folder, 1 << 20),
                                   key_prefix=s3_store.key_prefix)

    first = replica(s3_store.bucket)
    assert first.get_bytes("sst2", 1) == data and first.cache.misses == 1  # fetched once, then cached
    first.close()
    offline = replica(unreachable)  # restarted with the bucket gone: served from disk alone
    assert offline.get_bytes("sst2", 1) == data and offline.cache.hits == 1
    (folder / sha).write_bytes(data[:-1] + b"\x00")  # bit rot
    with pytest.raises(StoreUnavailable, match="object store"):
        offline.get_bytes("sst2", 1)  # the corrupt file is never served
    assert not (folder / sha).exists() and offline.cache.corrupt == 1
    offline.close()
    again = replica(s3_store.bucket)
    assert again.get_bytes("sst2", 1) == data and (folder / sha).read_bytes() == data  # refetched
    again.close()


def test_an_object_with_other_bytes_is_never_served(s3_store, tmp_path):
    info = s3_store.put("sst2", bundle(seed=3))
    key = s3_store.bucket.key_for("sst2", info.sha256)
    s3_store.bucket.client.put_object(Bucket=s3_store.bucket.bucket, Key=key, Body=b"tampered")
    reader = S3RedisAdapterStore(s3_store.url, s3_store.bucket, key_prefix=s3_store.key_prefix)  # no cache
    with pytest.raises(StoreUnavailable, match="wrong checksum"):
        reader.get_bytes("sst2", 1)
    reader.close()


def test_an_unreachable_bucket_is_store_unavailable_and_a_refused_upload_changes_nothing(s3_store):
    s3_store.put("sst2", bundle(seed=1))
    generation = s3_store.generation()
    down = S3Bucket(endpoint=f"http://127.0.0.1:{free_port()}", bucket="adapter-bundles", prefix="x",
                    access_key_id="AKIA-SECRET-ID", secret_access_key="very-secret-value", timeout_s=0.5)
    store = S3RedisAdapterStore(s3_store.url, down, key_prefix=s3_store.key_prefix)
    with pytest.raises(StoreUnavailable) as err:
        store.put("sst2", bundle(seed=2))
    assert re.search(r"object store \(bucket 'adapter-bundles' at http://127\.0\.0\.1:\d+\) unreachable", err.value.message)
    with pytest.raises(StoreUnavailable, match="object store"):
        store.ping()
    assert store.list_versions("sst2") == [1] and store.generation() == generation  # registry untouched
    assert store.get_active("sst2") == 1  # registry reads need Redis only
    for text in (err.value.message, repr(down), repr(store.bucket)):
        assert "very-secret-value" not in text and "AKIA-SECRET-ID" not in text
    store.close()


def test_gc_removes_only_unreferenced_objects_past_the_grace_period(s3_store):
    kept = s3_store.put("keep", bundle("keep", seed=1))
    gone = [s3_store.put("gone", bundle("gone", seed=s)) for s in (1, 2)]
    same = bundle("again", seed=1)
    again = s3_store.put("again", same)
    s3_store.delete_task("gone")
    s3_store.delete_task("again")
    assert s3_store.put("again", same).sha256 == again.sha256  # the same bytes again: the same key
    bucket = s3_store.bucket

    young = collect_garbage(s3_store, grace_s=3600)  # everything is young: nothing goes
    assert young.deleted == [] and young.young == 2 and young.referenced == 2
    s3_store.refs.reserve(bucket.key_for("gone", gone[0].sha256))  # a writer about to name this one
    later = datetime.now(timezone.utc) + timedelta(hours=2)
    report = collect_garbage(s3_store, grace_s=3600, now=later)
    assert report.deleted == [bucket.key_for("gone", gone[1].sha256)], report
    assert report.referenced == 3  # keep, again (re-uploaded), and the reserved one
    for info in (kept, again):
        assert s3_store.get_bytes(info.task, s3_store.get_active(info.task)) == s3_store.bucket.get(
            bucket.key_for(info.task, info.sha256), info.sha256)
    assert not bucket.exists(bucket.key_for("gone", gone[1].sha256))
    assert collect_garbage(s3_store, grace_s=3600, now=later).deleted == []  # idempotent


def test_a_second_writer_of_the_same_bytes_keeps_them_after_the_first_entry_is_deleted(s3_store):
    """Writer B has reserved the key and is writing; writer A of the same bytes registers, then A's task is
    deleted: B's reservation must still keep the collector away (A's registration drops only its own)."""
    data = bundle("twice", seed=3)
    key = s3_store.bucket.key_for("twice", hashlib.sha256(data).hexdigest())
    s3_store.refs.reserve(key)  # B, between its reservation and its registry write
    s3_store.put("twice", data)  # A: reserve, write, register
    s3_store.delete_task("twice")
    assert not s3_store.refs.claim(key)
    assert collect_garbage(s3_store, grace_s=0).deleted == []
    assert s3_store.bucket.exists(key)


def test_a_collector_holding_a_key_makes_a_writer_of_the_same_bytes_wait(s3_store):
    data = bundle("task", seed=1)
    info = s3_store.put("task", data)
    s3_store.delete_task("task")
    key = s3_store.bucket.key_for("task", info.sha256)
    assert s3_store.refs.claim(key)  # the collector is between its claim and its delete
    with pytest.raises(StoreUnavailable, match="being garbage-collected"):
        s3_store.refs.reserve(key, wait_s=0.2)
    s3_store.bucket.delete(key)
    s3_store.refs.release(key)
    assert s3_store.put("task", data).version == 2  # the writer proceeds, after the delete
    assert s3_store.bucket.exists(key)
    assert not s3_store.refs.claim(key)  # named again: no collector may take it


def test_a_collector_holds_its_claim_longer_than_its_delete_can_take(s3_store, monkeypatch):
    """The claim lapses by itself (a dead collector must not block writers for ever), so the collector holds it
    for longer than the bucket's slowest call: a writer of the same bytes cannot write before the delete ends."""
    info = s3_store.put("slow", bundle("slow", seed=5))
    s3_store.delete_task("slow")
    key = s3_store.bucket.key_for("slow", info.sha256)
    monkeypatch.setattr(s3_store.bucket, "timeout_s", 60.0)  # a deployment with slow S3 calls
    assert s3_store.bucket.longest_call_s >= 4 * 60.0
    seen: list[int] = []
    delete = s3_store.bucket.delete

    def observed(k):  # the claim's time left while the delete runs
        seen.append(int(s3_store.refs.client.pttl(s3_store.refs._marker(k))))
        delete(k)

    monkeypatch.setattr(s3_store.bucket, "delete", observed)
    assert collect_garbage(s3_store, grace_s=0).deleted == [key]
    assert len(seen) == 1 and seen[0] > s3_store.bucket.longest_call_s * 1000
    assert not s3_store.refs.holds_claim(key)  # released after the delete


def test_migrate_moves_redis_held_bytes_into_the_bucket_while_both_kinds_are_read(s3_store):
    redis_only = RedisAdapterStore(s3_store.url, key_prefix=s3_store.key_prefix)
    blobs = {(t, v): bundle(t, seed=v) for t in ("old-a", "old-b") for v in (1, 2)}
    for (task, _), data in blobs.items():
        redis_only.put(task, data)
    s3_store.put("new", bundle("new"))  # uploaded after the replicas got their bucket settings
    generation = s3_store.generation()
    assert s3_store.location("old-a", 1) is BlobKind.INLINE and s3_store.location("new", 1) is BlobKind.OBJECT
    assert s3_store.get_bytes("old-a", 2) == blobs[("old-a", 2)]  # both kinds read
    with pytest.raises(StoreUnavailable, match="no.*configured"):
        redis_only.get_bytes("new", 1)  # a replica without bucket settings says why it cannot

    counts = migrate_to_bucket(s3_store)
    assert counts == {MoveOutcome.MOVED: 4, MoveOutcome.ALREADY: 1}
    for (task, version), data in blobs.items():
        assert s3_store.location(task, version) is BlobKind.OBJECT
        assert s3_store.bucket.get(s3_store.bucket.key_for(task, hashlib.sha256(data).hexdigest()),
                                   hashlib.sha256(data).hexdigest()) == data
        assert s3_store.get_bytes(task, version) == data
    assert s3_store.generation() == generation  # no version changed: replicas have nothing to reload
    assert migrate_to_bucket(s3_store) == {MoveOutcome.ALREADY: 5}  # idempotent
    assert s3_store.move_to_object("old-a", 9) is MoveOutcome.GONE
    assert no_reservations_left(s3_store)
    redis_only.close()


def no_reservations_left(store: S3RedisAdapterStore) -> bool:
    """No writer's reservation of an object is still pending (each was released when its script ran)."""
    return store.client.zcard(store.refs.pending_key) == 0 and store.client.hlen(store.refs.counts_key) == 0


def test_an_import_the_registry_refuses_leaves_no_reservation_behind(s3_store):
    """`import_version` writes the object before its script decides; the script releases the writer's
    reservation whether it names the object or refuses the version, so a conflicting object is left to the
    collector at once instead of staying pending."""
    v1, other = bundle(seed=1), bundle(seed=9)
    assert s3_store.import_version("sst2", 1, v1) is ImportOutcome.WRITTEN
    assert s3_store.import_version("sst2", 1, v1) is ImportOutcome.UNCHANGED
    assert s3_store.import_version("sst2", 1, other) is ImportOutcome.CONFLICT
    assert s3_store.import_version("sst2", 3, bundle(seed=3)) is ImportOutcome.WRITTEN
    assert s3_store.import_version("sst2", 2, bundle(seed=2)) is ImportOutcome.RESERVED
    assert no_reservations_left(s3_store)
    conflicting = s3_store.bucket.key_for("sst2", hashlib.sha256(other).hexdigest())
    assert s3_store.bucket.exists(conflicting) and conflicting not in s3_store.refs.referenced()


def test_the_store_commands_migrate_and_collect(s3_store, seaweed, monkeypatch, tmp_path):
    redis_only = RedisAdapterStore(s3_store.url, key_prefix=s3_store.key_prefix)
    redis_only.put("legacy", bundle("legacy"))
    s3_store.put("doomed", bundle("doomed"))
    s3_store.delete_task("doomed")
    for name, value in {**seaweed.env(prefix=s3_store.bucket.prefix), "ADAPTER_SERVICE_REDIS_URL": s3_store.url,
                        "ADAPTER_SERVICE_REDIS_KEY_PREFIX": s3_store.key_prefix,
                        "ADAPTER_SERVICE_BLOB_CACHE_DIR": str(tmp_path / "command-blob-cache")}.items():
        monkeypatch.setenv(name, value)
    runner = CliRunner()
    migrated = runner.invoke(app, ["store", "migrate"])
    assert migrated.exit_code == 0, migrated.output
    assert "legacy v1: moved" in migrated.output and "moved 1 version(s)" in migrated.output
    assert s3_store.location("legacy", 1) is BlobKind.OBJECT
    collected = runner.invoke(app, ["store", "gc", "--grace-s", "0"])
    assert collected.exit_code == 0, collected.output
    assert re.search(r"deleted \S+/doomed/[0-9a-f]{64}\.safetensors", collected.output)
    assert "deleted 1 object(s)" in collected.output and "kept 1 referenced" in collected.output
    assert SECRET_KEY not in migrated.output + collected.output
    assert not (tmp_path / "command-blob-cache").exists()  # a one-off command keeps no local copy of what it read
    monkeypatch.setenv("ADAPTER_SERVICE_S3_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("ADAPTER_SERVICE_S3_TIMEOUT_S", "0.5")
    for command in ("gc", "migrate"):
        down = runner.invoke(app, ["store", command])
        assert down.exit_code == 1 and f"store {command} failed" in down.output, down.output
    monkeypatch.delenv("ADAPTER_SERVICE_S3_ENDPOINT")
    refused = runner.invoke(app, ["store", "gc"])
    assert refused.exit_code == 2 and "ADAPTER_SERVICE_S3_ENDPOINT" in refused.output
    redis_only.close()


def test_object_reads_are_signed_gets_that_answer_like_the_client(s3_store, seaweed, monkeypatch):
    """Reads go through `SignedGet` (a SigV4-signed plain GET), not the boto3 client's get_object: the exact
    bytes, and not found for a missing key. Any other answer (here a refusal: wrong credentials) is read again
    through the client, which maps it as every other call (the credentials in no message); a dead endpoint is
    unreachable at once. Without credentials to sign with, or behind a proxy, the client reads."""
    data = bundle(seed=4)
    info = s3_store.put("sst2", data)
    key = s3_store.bucket.key_for("sst2", info.sha256)
    client_reads = []
    real_get_object = s3_store.bucket.client.get_object

    def counted(**kwargs):
        client_reads.append(kwargs["Key"])
        return real_get_object(**kwargs)

    monkeypatch.setattr(s3_store.bucket.client, "get_object", counted)
    assert s3_store.bucket.get(key, info.sha256) == data
    with pytest.raises(ObjectNotFound, match=r"not found \(NoSuchKey\)"):
        s3_store.bucket.get(s3_store.bucket.key_for("sst2", "0" * 64), "0" * 64)
    assert client_reads == []

    wrong = S3Bucket(endpoint=seaweed.endpoint, bucket=seaweed.bucket, prefix=s3_store.bucket.prefix,
                     access_key_id=ACCESS_KEY, secret_access_key="wrong-secret-value")
    wrong_reads, wrong_get_object = [], wrong.client.get_object
    monkeypatch.setattr(wrong.client, "get_object", lambda **kw: wrong_reads.append(kw) or wrong_get_object(**kw))
    with pytest.raises(StoreUnavailable, match=r"refused reading .*SignatureDoesNotMatch") as err:
        wrong.get(key, info.sha256)
    assert wrong_reads and "wrong-secret-value" not in err.value.message
    assert not isinstance(err.value, ObjectNotFound)
    down = S3Bucket(endpoint=f"http://127.0.0.1:{free_port()}", bucket=seaweed.bucket, access_key_id=ACCESS_KEY,
                    secret_access_key=SECRET_KEY, timeout_s=0.5)
    with pytest.raises(StoreUnavailable, match="unreachable while reading"):
        down.get(key, info.sha256)

    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # a proxy the signed path would not go through
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    assert S3Bucket(endpoint=seaweed.endpoint, bucket=seaweed.bucket, access_key_id=ACCESS_KEY,
                    secret_access_key=SECRET_KEY)._read is None
    monkeypatch.delenv("HTTP_PROXY")
    monkeypatch.setattr("boto3.session.Session.get_credentials", lambda self: None)
    anonymous = S3Bucket(endpoint=seaweed.endpoint, bucket=seaweed.bucket, timeout_s=0.5)
    assert anonymous._read is None  # nothing to sign with
    anonymous_reads = []
    monkeypatch.setattr(anonymous.client, "get_object", lambda **kw: anonymous_reads.append(kw) or {"Body": BytesIO(data)})
    assert anonymous.get(key, info.sha256) == data and len(anonymous_reads) == 1  # the client reads


@pytest.mark.parametrize("kwargs, message", [
    (dict(access_key_id="id-only"), "set both or neither"),
    (dict(secret_access_key="secret-only"), "set both or neither"),
    (dict(prefix="bundles/../other"), "'..' segment"),
])
def test_a_bucket_refuses_half_credentials_and_dot_segments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        S3Bucket(endpoint="http://127.0.0.1:1", bucket="b", **kwargs)
