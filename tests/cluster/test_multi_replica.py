"""Three real replicas behind real nginx, sharing a private redis-server: an upload through the load balancer
is served by every replica, a rollback too, a replica killed mid-burst costs no request, a Redis outage
keeps resident tasks serving and loses no acknowledged upload, a replica that missed events catches up
through the periodic generation resync.

Every process is real and started here: redis-server (AOF, fsync always) on a free port, three
`adapter-service serve` on the tiny backbone, nginx on the deploy/ template. One cluster serves the whole
module (start-up is the expensive part); each case uses its own tasks and starts by healing the cluster
(restarting whatever an earlier case killed). Time limits here are correctness deadlines, generous for a
loaded 2-core CI machine; the 250 ms p99 propagation target is measured by bench/hotswap.py.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from service.bundles.codec import encode_bundle
from service.bundles.manifest import HeadType
from service.cluster.redis_store import RedisAdapterStore
from service.modeling.backbone import load_backbone
from tests.cluster.processes import NginxServer, RedisServer, ServiceReplica
from tests.conftest import make_manifest
from tests.synthetic import random_tensors

pytestmark = pytest.mark.cluster

TOKEN = "multi-replica-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
TEXT = "the quick brown fox jumps over the lazy dog"
RESYNC_S = 0.5  # replicas compare generations this often (production default: 2 s)
# Per replica and upload, from the upload's 201 to the replica answering with the new version. Events
# make it ~10-50 ms here; 1 s leaves room for a loaded CI machine and is still far below what the
# fallback paths (reconnect backoff, a missed event) would take.
PROPAGATION_S = 1.0
DEADLINE_S = 20.0  # waits on a condition (replicas ready, converged): generous, only a failure waits it out
TRAFFIC_TASKS = ["alpha", "beta", "delta", "epsilon", "zeta", "eta"]  # their versions never move
SEEDED = [*TRAFFIC_TASKS, "hot", "roll", "durable", "cold", "quiet", "laggard"]  # v1 of each, before any replica starts


def bundle(ref, task: str, k: int) -> bytes:
    """A regression bundle for `task` whose output is about 10*k: a prediction tells which weights served."""
    manifest = make_manifest(ref, task=task, head_type=HeadType.REGRESSION)
    tensors = random_tensors(manifest, seed=k, std=0.3)
    tensors["head.out.bias"].fill_(10.0 * k)
    return encode_bundle(manifest, tensors)


class Cluster:
    """redis-server + 3 replicas + nginx, with the clients and waits the cases share. `env` adds settings to
    every replica; `make_store` opens the test's own client of the shared store (Redis alone here)."""

    def __init__(self, root: Path, backbone_dir: str, *, replicas: int = 3, env: dict[str, str] | None = None):
        self.ref = load_backbone(backbone_dir, device="cpu", dtype="float32").ref
        self.redis = RedisServer(root / "redis")
        prefix = f"multi-{uuid.uuid4().hex[:8]}:"
        env = {**(env or {}),
            "ADAPTER_SERVICE_REDIS_URL": self.redis.url, "ADAPTER_SERVICE_REDIS_KEY_PREFIX": prefix,
            "ADAPTER_SERVICE_ADMIN_TOKEN": TOKEN, "ADAPTER_SERVICE_RESYNC_INTERVAL_S": str(RESYNC_S),
            "ADAPTER_SERVICE_REDIS_RECONNECT_MAX_S": "0.5", "ADAPTER_SERVICE_REDIS_TIMEOUT_S": "1",
            "ADAPTER_SERVICE_TORCH_THREADS": "1",
        }
        self.replicas = [ServiceReplica(root / f"r{i}", f"r{i}", backbone=backbone_dir,
                                        env={**env, "ADAPTER_SERVICE_BLOB_CACHE_DIR": str(root / f"r{i}" / "blobs")})
                         for i in range(replicas)]
        self.nginx = NginxServer(root / "nginx", [r.address for r in self.replicas])
        self.store = self.make_store(prefix)
        self.lb = httpx.Client(base_url=self.nginx.url, timeout=30)
        self.direct: dict[str, httpx.Client] = {}

    def make_store(self, prefix: str) -> RedisAdapterStore:
        return RedisAdapterStore(self.redis.url, key_prefix=prefix, replica_id="test", timeout_s=1.0)

    def start(self) -> Cluster:
        self.redis.start()
        for task in SEEDED:
            self.store.put(task, bundle(self.ref, task, 1))
        self._start_replicas(self.replicas)
        self.nginx.start()
        return self

    def close(self) -> None:
        for client in [self.lb, *self.direct.values()]:
            client.close()
        for proc in [self.nginx, *self.replicas]:
            with contextlib.suppress(Exception):
                if proc.proc is not None and proc.proc.poll() is None:
                    os.kill(proc.proc.pid, signal.SIGCONT)  # a case may have left it stopped
                proc.close()
        self.store.close()
        self.redis.close()

    def heal(self) -> None:
        """Restart whatever an earlier case stopped: Redis, dead replicas (same ports, so nginx finds them)."""
        if self.redis.proc is None:
            self.redis.start()
        dead = [r for r in self.replicas if r.proc is None or r.proc.poll() is not None]
        if dead:
            self._start_replicas(dead)
        for name in self.direct:
            assert wait_until(lambda n=name: self.ready(n), DEADLINE_S), f"{name} not ready: {self.log_tail(name)}"

    def _start_replicas(self, replicas: list[ServiceReplica]) -> None:
        with ThreadPoolExecutor(len(replicas)) as pool:  # ~3 s each on the tiny backbone: start them together
            list(pool.map(lambda r: r.start(), replicas))
        for r in replicas:
            old = self.direct.pop(r.name, None)
            if old is not None:
                old.close()
            self.direct[r.name] = httpx.Client(base_url=r.url, timeout=30)

    def replica(self, name: str) -> ServiceReplica:
        return next(r for r in self.replicas if r.name == name)

    def log_tail(self, name: str, n: int = 3000) -> str:
        return self.replica(name).log.read_text(errors="replace")[-n:]

    def ready(self, name: str) -> bool:
        with contextlib.suppress(httpx.HTTPError):
            return self.direct[name].get("/readyz").status_code == 200
        return False

    def upload(self, client: httpx.Client, task: str, k: int) -> httpx.Response:
        return client.post("/adapters", files={"file": (f"{task}.safetensors", bundle(self.ref, task, k))},
                           headers=ADMIN)

    def predict(self, client: httpx.Client, task: str) -> httpx.Response:
        return client.post(f"/predict/{task}", json={"text": TEXT})

    def served(self, name: str, task: str) -> tuple[int, float] | None:
        """(version, value) replica `name` answers `task` with, or None when it does not answer 200."""
        with contextlib.suppress(httpx.HTTPError):
            r = self.predict(self.direct[name], task)
            if r.status_code == 200:
                body = r.json()
                return body["version"], body["predictions"][0]["value"]
        return None

    def wait_serving(self, task: str, version: int, since: float, timeout: float = DEADLINE_S) -> dict[str, float]:
        """Poll every replica directly until each answers `task` with `version`; seconds from `since` to the
        first such answer, per replica."""
        reached: dict[str, float] = {}
        deadline = since + timeout
        while len(reached) < len(self.direct) and time.monotonic() < deadline:
            for name in self.direct.keys() - reached.keys():
                got = self.served(name, task)
                if got is not None and got[0] == version:
                    reached[name] = time.monotonic() - since
            time.sleep(0.005)
        missing = sorted(self.direct.keys() - reached.keys())
        assert not missing, (f"{missing} not serving {task} v{version} after {timeout}s "
                             f"(got {[self.served(n, task) for n in missing]}); log: {self.log_tail(missing[0])}")
        return reached

    def predictions_served(self, name: str) -> int:
        """Predict requests replica `name` has answered (any status), from its /metrics."""
        text = self.direct[name].get("/metrics").text
        return int(sum(float(v) for v in re.findall(r"^adapter_service_requests_total\{.*\} (\S+)$", text, re.M)))


class Traffic:
    """Predictions through nginx from a few threads until `stop()`: every answer recorded, with its time."""

    def __init__(self, url: str, tasks: list[str], threads: int = 3):
        self.url, self.tasks, self.threads = url, tasks, threads
        self.answers: list[tuple[float, str, int]] = []  # (monotonic time, task, HTTP status or -1)
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._workers: list[threading.Thread] = []
        self._lock = threading.Lock()

    def __enter__(self) -> Traffic:
        self._workers = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(self.threads)]
        for w in self._workers:
            w.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for w in self._workers:
            w.join(60)

    def count(self, status: int = 200, after: float = 0.0, before: float = float("inf")) -> int:
        with self._lock:
            return sum(1 for t, _, s in self.answers if s == status and after <= t <= before)

    def _run(self, i: int) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            n = i
            while not self._stop.is_set():
                task = self.tasks[n % len(self.tasks)]
                n += 1
                try:
                    r = client.post(f"/predict/{task}", json={"text": TEXT})
                    status, detail = r.status_code, r.text[:200]
                except httpx.HTTPError as exc:
                    status, detail = -1, repr(exc)
                with self._lock:
                    self.answers.append((time.monotonic(), task, status))
                    if status != 200:
                        self.failures.append(f"{task}: {status} {detail}")


class Uploads:
    """Uploads of `task` (k = 2, 3, ...) through nginx in a thread until the block ends: each status counted,
    each acknowledged version's sha256 kept."""

    def __init__(self, cluster: Cluster, task: str):
        self.cluster, self.task = cluster, task
        self.acked: dict[int, str] = {}  # version -> sha256 of every upload answered 201
        self.statuses: Counter = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Uploads:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(60)

    def _run(self) -> None:
        with httpx.Client(base_url=self.cluster.nginx.url, timeout=30) as client:
            k = 2
            while not self._stop.is_set():
                r = self.cluster.upload(client, self.task, k)
                self.statuses[r.status_code] += 1
                if r.status_code == 201:
                    self.acked[r.json()["version"]] = r.json()["sha256"]
                k += 1
                time.sleep(0.02)


def wait_until(predicate, timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


@pytest.fixture(scope="module")
def shared_cluster(tmp_path_factory, tiny_model_dirs) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path_factory.mktemp("multi-replica"), str(tiny_model_dirs["bert"]))
    try:
        yield cluster.start()
    finally:
        cluster.close()


@pytest.fixture
def cluster(shared_cluster) -> Cluster:
    shared_cluster.heal()
    return shared_cluster


def test_an_upload_through_nginx_is_served_by_every_replica(cluster, record_property):
    times = []
    for k in range(2, 7):
        r = cluster.upload(cluster.lb, "hot", k)
        acked = time.monotonic()
        assert r.status_code == 201, r.text
        assert r.json()["version"] == k  # versions 2, 3, ...: nginx never replayed an upload
        reached = cluster.wait_serving("hot", k, since=acked)
        times.append(round(max(reached.values()), 3))
        assert cluster.predict(cluster.lb, "hot").json()["version"] == k
    record_property("propagation_s", times)
    print(f"propagation to all replicas (s): {times}")
    assert max(times) < PROPAGATION_S, times


def test_a_rollback_propagates_to_every_replica(cluster):
    v1 = {name: cluster.served(name, "roll") for name in cluster.direct}
    assert {v for v, _ in v1.values()} == {1}
    r = cluster.upload(cluster.lb, "roll", 2)
    assert r.status_code == 201 and r.json()["version"] == 2, r.text
    cluster.wait_serving("roll", 2, since=time.monotonic())

    r = cluster.lb.put("/adapters/roll/active", json={"version": 1}, headers=ADMIN)
    acked = time.monotonic()
    assert r.status_code == 200 and r.json()["active_version"] == 1, r.text
    reached = cluster.wait_serving("roll", 1, since=acked)
    assert max(reached.values()) < PROPAGATION_S, reached
    for name, client in cluster.direct.items():
        # the weights of v1 again, not just its number
        assert cluster.served(name, "roll")[1] == pytest.approx(v1[name][1], abs=1e-4)
        detail = client.get("/adapters/roll").json()
        assert detail["active_version"] == 1 and [v["version"] for v in detail["versions"]] == [1, 2]

    r = cluster.lb.put("/adapters/roll/active", json={"version": 2}, headers=ADMIN)  # and forward again
    assert r.status_code == 200, r.text
    cluster.wait_serving("roll", 2, since=time.monotonic())


def test_killing_a_replica_mid_burst_fails_no_request(cluster):
    before = {name: cluster.predictions_served(name) for name in cluster.direct}
    for task in TRAFFIC_TASKS:  # load every traffic task on its replica (nginx hashes on the task)
        for _ in range(3):
            assert cluster.predict(cluster.lb, task).status_code == 200
    share = {name: cluster.predictions_served(name) - before[name] for name in cluster.direct}
    victim = max(share, key=share.get)  # the replica owning the most tasks: killing it moves the most
    assert share[victim] >= 3, share

    with Traffic(cluster.nginx.url, TRAFFIC_TASKS) as traffic:
        assert wait_until(lambda: traffic.count() >= 60, DEADLINE_S), traffic.failures[:5]
        cluster.replica(victim).kill()  # SIGKILL: requests in flight on it die with their connections
        killed = time.monotonic()
        assert wait_until(lambda: traffic.count(after=killed) >= 150, DEADLINE_S), traffic.failures[:5]
    assert traffic.failures == []
    after_kill = Counter(task for t, task, s in traffic.answers if t > killed and s == 200)
    assert set(after_kill) == set(TRAFFIC_TASKS), after_kill  # the victim's tasks moved on, none got stuck


def test_a_redis_outage_keeps_resident_tasks_serving_and_loses_no_acknowledged_upload(cluster):
    for name in cluster.direct:  # every traffic task resident on every replica, wherever nginx sends it
        for task in TRAFFIC_TASKS:
            assert cluster.served(name, task) == (1, pytest.approx(10.0, abs=5.0))
    with Traffic(cluster.nginx.url, TRAFFIC_TASKS) as traffic:
        with Uploads(cluster, "durable") as uploads:
            acked, upload_statuses = uploads.acked, uploads.statuses
            assert wait_until(lambda: len(acked) >= 4, DEADLINE_S), upload_statuses
            cluster.redis.stop(crash=True)  # SIGKILL, uploads in flight: only what was answered 201 counts
            down = time.monotonic()

            for name, client in cluster.direct.items():
                assert wait_until(lambda c=client: c.get("/readyz").status_code == 503, DEADLINE_S), name
                ready = client.get("/readyz").json()
                assert "Redis" in ready["checks"]["store"] and "store" in ready["detail"], ready
                degraded = client.get("/readyz", params={"allow_degraded": "true"})
                assert degraded.status_code == 200 and degraded.json()["status"] == "degraded", degraded.text
                cold = cluster.predict(client, "cold")  # in the registry, never loaded: needs Redis
                assert cold.status_code == 503 and "Redis" in cold.json()["detail"], cold.text
                for task in TRAFFIC_TASKS:  # resident: served without Redis
                    assert cluster.served(name, task)[0] == 1
            r = cluster.upload(cluster.lb, "durable", 1000)
            assert r.status_code == 503, r.text
            assert "adapter store (Redis) unreachable" in r.json()["detail"], r.text
            assert r.headers["Retry-After"]
            for method, path, body in [("GET", "/adapters", None), ("GET", "/adapters/alpha", None),
                                       ("PUT", "/adapters/alpha/active", {"version": 1})]:
                r = cluster.lb.request(method, path, json=body, headers=ADMIN)
                assert r.status_code == 503 and "Redis" in r.json()["detail"], (method, path, r.text)
            assert wait_until(lambda: upload_statuses[503] >= 3, DEADLINE_S), upload_statuses

        cluster.redis.start()  # same port and folder: the AOF is replayed
        up = time.monotonic()
        # a write while the replicas are still reconnecting: they learn of it by event or by the resync
        # that follows every reconnection
        assert cluster.store.put("durable", bundle(cluster.ref, "durable", 3000)).version > max(acked)
        for name in cluster.direct:  # each replica reconnects on its own (backoff capped at 0.5 s here)
            assert wait_until(lambda n=name: cluster.ready(n), DEADLINE_S), cluster.log_tail(name)
        time.sleep(0.2)  # traffic after the recovery too
    assert traffic.failures == [], traffic.failures[:5]
    assert traffic.count(after=down, before=up) >= 10  # traffic really ran during the outage

    assert set(upload_statuses) <= {201, 503}, upload_statuses  # refused cleanly, never a 500
    for version, sha in acked.items():  # every acknowledged upload survived the crash
        assert cluster.store.get_info("durable", version).sha256 == sha
    active = cluster.store.get_active("durable")
    assert active >= max(acked)  # an upload cut off by the crash may have landed without its 201
    cluster.wait_serving("durable", active, since=up)

    r = cluster.upload(cluster.lb, "durable", 2000)  # and writes work again, for every replica
    assert r.status_code == 201, r.text
    cluster.wait_serving("durable", r.json()["version"], since=time.monotonic())


def test_a_write_no_replica_heard_of_is_found_by_the_generation_check(cluster):
    quiet = RedisAdapterStore(cluster.redis.url, key_prefix=cluster.store.key_prefix, replica_id="quiet",
                              announce=False)
    try:  # v2 with no event at all, as if pub/sub had dropped the message on its way to every replica
        assert quiet.put("quiet", bundle(cluster.ref, "quiet", 2)).version == 2
        written = time.monotonic()
    finally:
        quiet.close()
    # only the periodic generation check (every RESYNC_S) can find it; ten intervals of slack for a
    # loaded machine
    reached = cluster.wait_serving("quiet", 2, since=written, timeout=10 * RESYNC_S)
    print(f"converged through the generation check after (s): {reached}")
    for name in cluster.direct:
        assert cluster.served(name, "quiet") == (2, pytest.approx(20.0, abs=5.0))


def test_a_replica_whose_subscription_dropped_an_event_catches_up_by_resync(cluster):
    laggard, writer, other = cluster.replicas[2], cluster.replicas[0].name, cluster.replicas[1].name
    admin = cluster.redis.client()
    os.kill(laggard.proc.pid, signal.SIGSTOP)  # frozen: cannot notice anything until SIGCONT
    try:
        # Redis drops every subscription; the two running replicas resubscribe at once, the frozen one
        # cannot, so the next event never reaches it
        admin.client_kill_filter(_type="pubsub")
        assert wait_until(lambda: len(admin.client_list(_type="pubsub")) == 2, DEADLINE_S)
        r = cluster.upload(cluster.direct[writer], "laggard", 2)
        assert r.status_code == 201 and r.json()["version"] == 2, r.text
        for name in (writer, other):  # the event reached the subscribed replicas
            assert wait_until(lambda n=name: (cluster.served(n, "laggard") or (0,))[0] == 2, DEADLINE_S)
    finally:
        os.kill(laggard.proc.pid, signal.SIGCONT)
        admin.close()
    resumed = time.monotonic()
    # its dead subscription fails on the first read: it reconnects, and a reconnection always resyncs
    reached = cluster.wait_serving("laggard", 2, since=resumed, timeout=10 * RESYNC_S)
    print(f"the laggard caught up after (s): {reached[laggard.name]}")
    assert cluster.served(laggard.name, "laggard") == (2, pytest.approx(20.0, abs=5.0))
