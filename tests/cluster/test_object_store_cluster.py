"""Two real replicas behind real nginx with the registry in a private redis-server and the bundle bytes in a
private SeaweedFS (S3): uploads, rollbacks and deletes through the load balancer reach every replica fast,
an object-store outage keeps resident tasks serving and answers 503 for what needs the bucket, a replica
killed mid-upload leaves no entry without its object, and GC removes only what no entry names.

The harness is test_multi_replica's `Cluster` (same waits, same traffic) with the S3 settings added; one
cluster serves the module and each case heals it first.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from service.cluster.gc import collect_garbage
from service.cluster.s3_store import S3RedisAdapterStore
from tests.cluster.seaweed import SeaweedServer
from tests.cluster.test_multi_replica import (
    ADMIN,
    DEADLINE_S,
    TRAFFIC_TASKS,
    Cluster,
    Traffic,
    Uploads,
    wait_until,
)

pytestmark = pytest.mark.cluster

PROPAGATION_P99_S = 0.25


class S3Cluster(Cluster):
    """redis-server + SeaweedFS + 2 replicas using both + nginx."""

    def __init__(self, root: Path, backbone_dir: str):
        self.seaweed = SeaweedServer(root / "seaweed")
        super().__init__(root, backbone_dir, replicas=2, env=self.seaweed.env())

    def make_store(self, prefix: str) -> S3RedisAdapterStore:
        return S3RedisAdapterStore(self.redis.url, self.seaweed.bucket_client(), key_prefix=prefix,
                                   replica_id="test", timeout_s=1.0)

    @property
    def s3(self) -> S3RedisAdapterStore:
        assert isinstance(self.store, S3RedisAdapterStore)
        return self.store

    def start(self) -> S3Cluster:
        self.seaweed.start()
        super().start()
        return self

    def heal(self) -> None:
        if self.seaweed.proc is None:
            self.seaweed.start()
        super().heal()

    def close(self) -> None:
        super().close()
        self.seaweed.close()

    def object_key(self, task: str, version: int) -> str:
        return self.s3.client.hget(self.s3._version_key(task, version), "object").decode()


@pytest.fixture(scope="module")
def shared_cluster(tmp_path_factory, tiny_model_dirs) -> Iterator[S3Cluster]:
    cluster = S3Cluster(tmp_path_factory.mktemp("s3-cluster"), str(tiny_model_dirs["bert"]))
    try:
        yield cluster.start()
    finally:
        cluster.close()


@pytest.fixture
def cluster(shared_cluster) -> S3Cluster:
    shared_cluster.heal()
    return shared_cluster


def test_an_upload_through_nginx_is_served_by_every_replica_within_250_ms_p99(cluster, record_property):
    for name in cluster.direct:  # resident everywhere: each new version is pre-loaded from the bucket
        assert cluster.served(name, "hot")[0] == 1
    times = []
    for k in range(2, 22):
        r = cluster.upload(cluster.lb, "hot", k)
        acked = time.monotonic()
        assert r.status_code == 201, r.text
        assert r.json()["version"] == k
        times.append(max(cluster.wait_serving("hot", k, since=acked).values()))
    p99 = statistics.quantiles(times, n=100, method="inclusive")[98]
    record_property("propagation_p99_s", p99)
    print(f"propagation to both replicas: p50 {statistics.median(times) * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms")
    assert p99 < PROPAGATION_P99_S, sorted(times)
    key = cluster.object_key("hot", 21)  # the bytes are in the bucket, the registry names them
    assert cluster.s3.bucket.exists(key) and not cluster.s3.client.hexists(cluster.s3._version_key("hot", 21), "bundle")


def test_rollback_and_delete_propagate_and_gc_then_removes_only_the_deleted_task(cluster):
    r = cluster.upload(cluster.lb, "roll", 2)
    assert r.status_code == 201 and r.json()["version"] == 2, r.text
    cluster.wait_serving("roll", 2, since=time.monotonic())
    r = cluster.lb.put("/adapters/roll/active", json={"version": 1}, headers=ADMIN)
    assert r.status_code == 200, r.text
    reached = cluster.wait_serving("roll", 1, since=time.monotonic())
    for name in cluster.direct:
        assert cluster.served(name, "roll")[1] == pytest.approx(10.0, abs=5.0)  # v1's weights again
    print(f"rollback reached the replicas after (s): {reached}")

    doomed = [cluster.object_key("roll", v) for v in (1, 2)]
    r = cluster.lb.delete("/adapters/roll", headers=ADMIN)
    assert r.status_code == 204, r.text
    for name, client in cluster.direct.items():
        assert wait_until(lambda c=client: cluster.predict(c, "roll").status_code == 404, DEADLINE_S), name
    assert all(cluster.s3.bucket.exists(k) for k in doomed)  # entries gone at once, objects left to GC

    report = collect_garbage(cluster.s3, grace_s=0)
    assert sorted(report.deleted) == sorted(doomed), report
    for key in cluster.s3.refs.referenced():  # everything the registry names is still there
        assert cluster.s3.bucket.exists(key), key
    for name in cluster.direct:
        assert cluster.served(name, "alpha")[0] == 1


def test_an_object_store_outage_keeps_resident_tasks_serving_and_loses_no_acknowledged_upload(cluster):
    for name in cluster.direct:
        for task in TRAFFIC_TASKS:
            assert cluster.served(name, task)[0] == 1
    with Traffic(cluster.nginx.url, TRAFFIC_TASKS) as traffic:
        with Uploads(cluster, "durable") as uploads:
            acked, statuses = uploads.acked, uploads.statuses
            assert wait_until(lambda: len(acked) >= 3, DEADLINE_S), statuses
            cluster.seaweed.stop(crash=True)
            down = time.monotonic()
            for name, client in cluster.direct.items():
                assert wait_until(lambda c=client: c.get("/readyz").status_code == 503, DEADLINE_S), name
                assert "object store" in client.get("/readyz").json()["checks"]["store"]
                assert client.get("/readyz", params={"allow_degraded": "true"}).status_code == 200
                cold = cluster.predict(client, "cold")  # in the registry, never loaded: needs the bucket
                assert cold.status_code == 503, cold.text
                assert "object store (bucket 'adapter-bundles'" in cold.json()["detail"] and "unreachable" in cold.text
                for task in TRAFFIC_TASKS:
                    assert cluster.served(name, task)[0] == 1
            r = cluster.upload(cluster.lb, "durable", 1000)
            assert r.status_code == 503 and "object store" in r.json()["detail"], r.text
            assert r.headers["Retry-After"]
            assert cluster.lb.get("/adapters/alpha", headers=ADMIN).status_code == 200  # the registry is Redis
            assert wait_until(lambda: statuses[503] >= 3, DEADLINE_S), statuses
        cluster.seaweed.start()
        up = time.monotonic()
        for name in cluster.direct:
            assert wait_until(lambda n=name: cluster.ready(n), DEADLINE_S), cluster.log_tail(name)
    assert traffic.failures == [], traffic.failures[:5]
    assert traffic.count(after=down, before=up) >= 10
    assert set(statuses) <= {201, 503}, statuses
    for version, sha in acked.items():  # every acknowledged upload's bytes survived, and are the right ones
        info = cluster.s3.get_info("durable", version)
        assert info.sha256 == sha
        assert cluster.s3.bucket.get(cluster.object_key("durable", version), sha)
    for name in cluster.direct:  # converged: cold loads and uploads work again
        assert cluster.served(name, "cold")[0] == 1
    r = cluster.upload(cluster.lb, "durable", 2000)
    assert r.status_code == 201, r.text
    cluster.wait_serving("durable", r.json()["version"], since=time.monotonic())


def test_a_replica_killed_mid_upload_leaves_no_entry_without_its_object(cluster):
    victim = cluster.replicas[0]
    acked: list[int] = []
    errors: Counter = Counter()

    def upload(k: int) -> None:
        try:
            r = cluster.upload(cluster.direct[victim.name], "crash", k)
            if r.status_code == 201:
                acked.append(r.json()["version"])
        except httpx.HTTPError as exc:
            errors[type(exc).__name__] += 1

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(upload, k) for k in range(1, 41)]
        assert wait_until(lambda: len(acked) >= 4, DEADLINE_S)
        victim.kill()  # SIGKILL with uploads in flight
        for f in futures:
            f.result(60)
    assert errors, "no upload was cut off: the kill came too late to test anything"
    versions = cluster.s3.list_versions("crash")
    assert set(acked) <= set(versions)
    for version in versions:  # every entry, acknowledged or not, names an object that is there
        info = cluster.s3.get_info("crash", version)
        assert cluster.s3.bucket.get(cluster.object_key("crash", version), info.sha256)
