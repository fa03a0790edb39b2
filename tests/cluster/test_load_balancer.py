"""The load-balancer template under real nginx, in front of small stand-in HTTP backends: task affinity by
consistent hashing, predictions replayed on the next replica when one fails, management writes never
replayed. (The same template in front of real replicas is exercised by the multi-replica tests.)"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from tests.cluster.processes import NginxServer

pytestmark = pytest.mark.cluster

TASKS = [f"task-{i}" for i in range(48)]


class Backend:
    """A stand-in replica: answers 200 with its name, or 503 (`mode="503"`), or hangs up without an answer
    after reading the request (`mode="drop"`); remembers every request it saw."""

    def __init__(self, name: str):
        self.name = name
        self.mode = "ok"
        self.hits: list[tuple[str, str]] = []
        backend = self

        class Handler(BaseHTTPRequestHandler):
            def handle_one(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                backend.hits.append((self.command, self.path))
                if backend.mode == "drop":
                    self.close_connection = True
                    return
                status = 503 if backend.mode == "503" else 200
                body = json.dumps({"backend": backend.name}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_DELETE = handle_one

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def backends() -> Iterator[list[Backend]]:
    group = [Backend(f"r{i}") for i in range(3)]
    try:
        yield group
    finally:
        for b in group:
            b.stop()


@pytest.fixture
def lb(tmp_path, backends) -> Iterator[httpx.Client]:
    nginx = NginxServer(tmp_path / "nginx", [b.address for b in backends], max_body="64k")
    try:
        nginx.start()
        with httpx.Client(base_url=nginx.url, timeout=10) as client:
            yield client
    finally:
        nginx.close()


def served_by(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["backend"]


def test_the_rendered_template_passes_nginx_t(tmp_path):
    nginx = NginxServer(tmp_path / "nginx", ["127.0.0.1:18001", "127.0.0.1:18002", "127.0.0.1:18003"])
    result = nginx.check()
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


def test_each_task_sticks_to_one_replica_and_tasks_spread(lb):
    owner = {t: served_by(lb.post(f"/predict/{t}", json={"inputs": ["x"]})) for t in TASKS}
    for t in TASKS:
        for _ in range(2):
            assert served_by(lb.post(f"/predict/{t}", json={"inputs": ["x"]})) == owner[t]
    assert len(set(owner.values())) == 3  # 48 tasks over 3 replicas: all get some


def test_oip_inference_follows_the_same_task_affinity_and_is_replayed(lb, backends):
    """/v2/models/<task>/infer hashes on the task like /predict/<task>, so both reach the replica whose
    cache holds it, and is replayed on the next replica after a 503 like a prediction."""
    for t in TASKS[:12]:
        owner = served_by(lb.post(f"/predict/{t}", json={"inputs": ["x"]}))
        assert served_by(lb.post(f"/v2/models/{t}/infer", json={"inputs": []})) == owner
        assert served_by(lb.post(f"/v2/models/{t}/versions/1/infer", json={"inputs": []})) == owner
    t = TASKS[0]
    owner = next(b for b in backends if b.name == served_by(lb.post(f"/predict/{t}", json={})))
    owner.mode = "503"
    assert served_by(lb.post(f"/v2/models/{t}/infer", json={"inputs": []})) != owner.name


def test_predictions_move_to_the_next_replica_when_one_dies(lb, backends):
    owner = {t: served_by(lb.post(f"/predict/{t}", json={})) for t in TASKS}
    victim = next(b for b in backends if b.name == owner[TASKS[0]])
    victim.stop()
    moved = {t: served_by(lb.post(f"/predict/{t}", json={})) for t in TASKS for _ in range(3)}  # all 200
    assert victim.name not in moved.values()
    # only the dead replica's tasks moved: consistent hashing leaves the others where they were
    assert all(moved[t] == owner[t] for t in TASKS if owner[t] != victim.name)


def test_predictions_are_replayed_after_a_503_or_a_dropped_connection(lb, backends):
    shedding, dropping, healthy = backends
    shedding.mode, dropping.mode = "503", "drop"
    for t in TASKS:  # every task, whichever replica owns it, is answered by the healthy one
        assert served_by(lb.post(f"/predict/{t}", json={})) == healthy.name
    assert any(h[0] == "POST" for h in shedding.hits) and any(h[0] == "POST" for h in dropping.hits)
    assert served_by(lb.post("/embed", json={"inputs": ["x"]})) == healthy.name


def test_uploads_are_never_replayed(lb, backends):
    for b in backends:
        b.mode = "drop"
    upload = lb.post("/adapters", files={"file": ("b.safetensors", b"x" * 100)})
    assert upload.status_code == 502
    assert sum(h == ("POST", "/adapters") for b in backends for h in b.hits) == 1  # sent once, never again
    # PUT (move the pointer), DELETE and GET are idempotent: replaying one leaves the same state, so they
    # may go to a second replica (proxy_next_upstream_tries 2), never more
    for method in ("PUT", "DELETE", "GET"):
        assert lb.request(method, "/adapters/sst2").status_code == 502
        assert sum(h == (method, "/adapters/sst2") for b in backends for h in b.hits) == 2


def test_request_bodies_are_capped(lb):
    assert lb.post("/adapters", content=b"x" * 100_000).status_code == 413
