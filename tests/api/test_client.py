"""service.client (Client, AsyncClient) and the CLI commands on it, against a real `adapter-service serve`
process (uvicorn) on the tiny BERT with one task per head type. Retries are checked through a real HTTP
proxy in front of the server that answers 503 (or drops the connection) for the next N requests."""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
import threading
import time
import zipfile
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from typer.testing import CliRunner

from service.bundles.manifest import HeadType
from service.bundles.store import LocalAdapterStore
from service.cli import app as cli_app
from service.client import (
    ApiError,
    AsyncClient,
    ClassificationPrediction,
    Client,
    ConnectionFailed,
    Forbidden,
    Invalid,
    MultilabelPrediction,
    NotFound,
    OtherPrediction,
    PredictResult,
    QAPrediction,
    RegressionPrediction,
    RetryPolicy,
    TokenClassificationPrediction,
    TooLarge,
    Unauthorized,
    Unavailable,
)
from service.client.batches import LineError, batches
from service.client.retry import parse_retry_after
from service.modeling.backbone import load_backbone
from tests.api.conftest import ADMIN, TASKS, tiny_server
from tests.conftest import LABELS, make_bundle, make_manifest
from tests.procs import VENV_BIN, free_port

MAX_CHARS = 2000
CONTEXT = "The Eiffel Tower is a wrought-iron lattice tower in Paris, France, built between 1887 and 1889."
NER_TEXT = "John Smith flew from Paris to Berlin on Monday."
TYPES = {
    "sentiment": ClassificationPrediction, "topics": MultilabelPrediction, "similarity": RegressionPrediction,
    "ner": TokenClassificationPrediction, "squad": QAPrediction,
}


# --- a real server, and a proxy in front of it -------------------------------------------------------------


@pytest.fixture(scope="module")
def backbone_ref(tiny_model_dirs):
    return load_backbone(str(tiny_model_dirs["bert"]), device="cpu", dtype="float32").ref


@pytest.fixture(scope="module")
def server(tiny_model_dirs, backbone_ref, tmp_path_factory):
    """One server for the module: the five seeded tasks stay as they are (tests add and delete their own)."""
    root = tmp_path_factory.mktemp("client")
    store = LocalAdapterStore(root / "store")
    for i, (task, head) in enumerate(TASKS.items()):
        store.put(task, make_bundle(make_manifest(backbone_ref, task=task, head_type=head), seed=i))
    with tiny_server(tiny_model_dirs["bert"], store.root, root / "server.log", ADAPTER_SERVICE_MAX_WAIT_MS="2",
                     ADAPTER_SERVICE_MAX_TEXT_CHARS=str(MAX_CHARS)) as proc:
        yield proc


class FlakyProxy(ThreadingHTTPServer):
    """Forwards every request to `upstream`, except the next `fail` ones, answered 503 (with `Retry-After`
    when set), and the next `drop` ones, whose connection is closed without an answer. `seen`: (method,
    path, monotonic time) of every request received."""

    daemon_threads = True
    DETAIL = "proxy says: overloaded, come back later"

    def __init__(self, upstream: str):
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.upstream, self.url = upstream, f"http://127.0.0.1:{self.server_address[1]}"
        self.lock = threading.Lock()
        self.reset()

    def reset(self, fail: int = 0, retry_after: str | None = None, drop: int = 0) -> None:
        with self.lock:
            self.fail, self.retry_after, self.drop = fail, retry_after, drop
            self.seen: list[tuple[str, str, float]] = []

    def take(self, method: str, path: str) -> str:
        with self.lock:
            self.seen.append((method, path, time.monotonic()))
            if self.drop:
                self.drop -= 1
                return "drop"
            if self.fail:
                self.fail -= 1
                return "fail"
            return "forward"


class _ProxyHandler(BaseHTTPRequestHandler):
    server: FlakyProxy

    def _handle(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        action = self.server.take(self.command, self.path)
        if action == "drop":
            self.close_connection = True
            return
        if action == "fail":
            status, content = 503, json.dumps({"detail": FlakyProxy.DETAIL}).encode()
            headers = {"content-type": "application/json"}
            if self.server.retry_after is not None:
                headers["retry-after"] = self.server.retry_after
        else:
            skip = {"host", "content-length", "connection", "accept-encoding"}
            r = httpx.request(self.command, self.server.upstream + self.path, content=body, timeout=60,
                              headers={k: v for k, v in self.headers.items() if k.lower() not in skip})
            status, content = r.status_code, r.content
            headers = {k: v for k, v in r.headers.items()
                       if k.lower() not in {"content-length", "content-encoding", "transfer-encoding", "connection"}}
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("content-length", str(len(content)))
        self.end_headers()
        self.wfile.write(content)

    do_GET = do_POST = do_PUT = do_DELETE = _handle

    def log_message(self, format, *args) -> None:  # quiet
        pass


@pytest.fixture(scope="module")
def proxy(server):
    p = FlakyProxy(server.url)
    thread = threading.Thread(target=p.serve_forever, daemon=True)
    thread.start()
    try:
        yield p
    finally:
        p.shutdown()
        p.server_close()


def bundle(ref, task: str, seed: int, head: HeadType = HeadType.CLASSIFICATION) -> bytes:
    return make_bundle(make_manifest(ref, task=task, head_type=head), seed=seed)


# --- the client on its own ----------------------------------------------------------------------------------


def test_the_client_imports_without_torch_or_the_server():
    heavy = ["torch", "transformers", "fastapi", "numpy", "service.api", "service.kinds", "service.runtime"]
    code = ("import sys, service.client, service.client.batches; "
            f"print([m for m in {heavy!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_retry_after_backoff_and_jsonl_batching_rules():
    assert parse_retry_after("5") == 5 and parse_retry_after(" 2.5 ") == 2.5 and parse_retry_after("-3") == 0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    now = datetime(2030, 1, 1, tzinfo=timezone.utc)
    assert parse_retry_after(format_datetime(now + timedelta(seconds=10), usegmt=True), now=now) == 10
    policy = RetryPolicy(backoff=0.5, max_wait=3, jitter=0.25)
    for attempt, base in [(0, 0.5), (1, 1.0), (2, 2.0)]:
        assert base <= policy.wait(attempt) <= base * 1.25
    assert policy.wait(10) == 3 and policy.wait(0, retry_after=3600) == 3  # no single wait over the cap
    assert 1 <= policy.wait(5, retry_after=1) <= 1.25  # the server's Retry-After, not the backoff

    lines = ['{"text": "a"}', '{"text": "b"}', "", '{"text": "c", "text_pair": "d"}', '{"text": "e"}',
             '{"text": "f"}', '{"text": "g"}', '{"question": "q", "context": "c"}']
    got = [(b.first_line, b.last_line, b.body) for b in batches(lines, batch_size=2)]
    assert got == [(1, 2, {"texts": ["a", "b"]}), (4, 4, {"texts": ["c"], "text_pairs": ["d"]}),
                   (5, 6, {"texts": ["e", "f"]}), (7, 7, {"texts": ["g"]}),
                   (8, 8, {"questions": ["q"], "contexts": ["c"]})]
    with pytest.raises(LineError, match=r"line 2: a line holds .*got \{id, text\}"):
        list(batches(['{"text": "a"}', '{"text": "b", "id": 1}'], batch_size=8))
    assert isinstance(PredictResult.model_validate(
        {"task": "t", "version": 1, "predictions": [{"novel": [1, 2]}]}).predictions[0], OtherPrediction)


# --- predictions --------------------------------------------------------------------------------------------


def test_sync_client_predicts_every_head_type_with_typed_results(server):
    with Client(server.url) as client:
        readiness = client.ready()
        assert readiness.ready and readiness.status == "ready" and readiness.checks["store"] == "ok"
        calls = {
            "sentiment": dict(text="a gripping, beautifully shot film"),
            "topics": dict(texts=["the match went to penalties", "parliament passed the bill"]),
            "similarity": dict(text="A man plays a guitar.", text_pair="A person plays an instrument."),
            "ner": dict(text=NER_TEXT),
            "squad": dict(question="Where is the Eiffel Tower?", context=CONTEXT),
        }
        for task, inputs in calls.items():
            result = client.predict(task, **inputs)
            raw = httpx.post(f"{server.url}/predict/{task}", json=inputs).json()
            assert result.task == task and result.version == 1
            assert all(type(p) is TYPES[task] and p.truncated is False for p in result.predictions)
            # nothing lost or changed on the way: the typed result dumps back to the server's JSON
            assert result.model_dump(mode="json", exclude_defaults=True) == raw

        (c,) = client.predict("sentiment", "a gripping film").predictions
        assert isinstance(c, ClassificationPrediction) and c.label in LABELS[HeadType.CLASSIFICATION]
        assert c.score == max(c.scores.values()) == c.scores[c.label] and math.isclose(sum(c.scores.values()), 1, rel_tol=1e-6)  # float32 softmax
        for m in client.predict("topics", texts=["a", "b"]).predictions:
            assert isinstance(m, MultilabelPrediction) and list(m.scores) == LABELS[HeadType.MULTILABEL]
            assert m.labels == [k for k, v in m.scores.items() if v >= 0.5]
        (r,) = client.predict("similarity", "a", text_pair="b").predictions
        assert isinstance(r, RegressionPrediction) and math.isfinite(r.value)
        (t,) = client.predict("ner", NER_TEXT).predictions
        assert isinstance(t, TokenClassificationPrediction)
        assert all(NER_TEXT[e.start:e.end] == e.text and e.entity in {"PER", "LOC"} for e in t.entities)
        (q,) = client.predict("squad", question="When was it built?", context=CONTEXT).predictions
        assert isinstance(q, QAPrediction) and q.answer == CONTEXT[q.start:q.end]
        (long,) = client.predict("sentiment", "word " * 300).predictions  # 300 tokens > 128 positions
        assert long.truncated is True


@pytest.mark.anyio
async def test_async_client_predicts_every_head_type_concurrently_and_embeds(server):
    async with AsyncClient(server.url) as client:
        import asyncio

        results = await asyncio.gather(
            client.predict("sentiment", texts=["good", "bad", "fine"]),
            client.predict("topics", "the match went to penalties"),
            client.predict("similarity", texts=["a", "b"], text_pairs=["c", "d"]),
            client.predict("ner", NER_TEXT),
            client.predict("squad", questions=["Where?", "When?"], contexts=[CONTEXT, CONTEXT]),
        )
        embedded = await client.embed(["hello world", "another sentence"])
        assert (await client.ready()).ready
    for (task, cls), result, n in zip(TYPES.items(), results, [3, 1, 2, 1, 2]):
        assert result.task == task and len(result.predictions) == n
        assert all(type(p) is cls for p in result.predictions)
    assert all(isinstance(q, QAPrediction) and q.answer == CONTEXT[q.start:q.end] for q in results[4].predictions)
    assert len(embedded.embeddings) == 2 and all(len(v) == 32 for v in embedded.embeddings)  # tiny BERT: hidden 32
    assert all(math.isclose(math.sqrt(sum(x * x for x in v)), 1, rel_tol=1e-4) for v in embedded.embeddings)


# --- management ---------------------------------------------------------------------------------------------


def test_upload_activate_describe_delete(server, backbone_ref, tmp_path):
    path = tmp_path / "reviews.safetensors"
    path.write_bytes(bundle(backbone_ref, "reviews", seed=11))
    with Client(server.url, token=ADMIN) as client:
        first = client.upload(path)
        assert (first.task, first.version, first.active, first.head_type) == ("reviews", 1, True, "classification")
        assert first.labels == LABELS[HeadType.CLASSIFICATION]
        second = client.upload(bundle(backbone_ref, "reviews", seed=12))  # bytes work as well as a path
        assert second.version == 2 and second.sha256 != first.sha256
        assert client.predict("reviews", "x").version == 2

        rolled = client.activate("reviews", 1)
        assert (rolled.task, rolled.active_version, rolled.sha256) == ("reviews", 1, first.sha256)
        assert client.predict("reviews", "x").version == 1
        detail = client.describe("reviews")
        assert detail.active_version == 1 and [(v.version, v.active) for v in detail.versions] == [(1, True), (2, False)]
        assert detail.versions[1].manifest["task"] == "reviews" and detail.versions[1].sha256 == second.sha256
        listed = {t.task: t for t in client.list()}
        assert listed["reviews"].versions == [1, 2] and set(listed) >= set(TASKS)

        client.delete("reviews")
        assert "reviews" not in {t.task for t in client.list()}
        with pytest.raises(NotFound) as err:
            client.predict("reviews", "x")
        assert (err.value.status, err.value.detail) == (404, "unknown task 'reviews'")


@pytest.mark.anyio
async def test_async_upload_of_a_peft_archive_with_task_and_labels(server, tiny_model_dirs, tmp_path):
    from peft import TaskType

    from tests.unit.test_peft_import import _peft_model, _saved

    model = _peft_model(tiny_model_dirs["bert"], TaskType.SEQ_CLS, 3, dict(r=4, lora_alpha=8,
                                                                          target_modules=["query", "value"]))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in _saved(model, tmp_path / "lora").items():
            zf.writestr(f"my-lora/{name}", data)
    archive = tmp_path / "my-lora.zip"
    archive.write_bytes(buf.getvalue())
    async with AsyncClient(server.url, token=ADMIN) as client:
        with pytest.raises(Invalid, match="needs the form field 'task'"):
            await client.upload(archive)
        up = await client.upload(archive, task="lora-reviews", labels=["bad", "neutral", "good"])
        assert (up.task, up.version, up.head_type, up.labels) == ("lora-reviews", 1, "classification",
                                                                  ["bad", "neutral", "good"])
        (p,) = (await client.predict("lora-reviews", "great film")).predictions
        assert isinstance(p, ClassificationPrediction) and set(p.scores) == {"bad", "neutral", "good"}
        await client.delete("lora-reviews")
        with pytest.raises(NotFound):
            await client.describe("lora-reviews")


# --- errors -------------------------------------------------------------------------------------------------


def test_errors_carry_the_servers_status_and_message(server, backbone_ref):
    with Client(server.url) as client:
        cases = [
            (lambda: client.predict("nope", "x"), NotFound, 404, "unknown task 'nope'"),
            (lambda: client.predict("sentiment", ""), Invalid, 422, "'text' is empty"),
            (lambda: client.predict("sentiment", question="why?", context="because"), Invalid, 422,
             "this task is classification, not question answering: send text or texts"),
            (lambda: client.predict("sentiment", "x" * (MAX_CHARS + 1)), TooLarge, 413,
             f"'text' has {MAX_CHARS + 1} characters; the limit is {MAX_CHARS}"),
            (lambda: client.describe("nope"), NotFound, 404, "unknown task 'nope'"),
            (lambda: client.upload(b"x"), Unauthorized, 401,
             "missing admin token: send 'Authorization: Bearer <token>'"),
        ]
        for call, cls, status, detail in cases:
            with pytest.raises(cls) as err:
                call()
            assert isinstance(err.value, ApiError) and (err.value.status, str(err.value)) == (status, detail)
    with Client(server.url, token="wrong") as client, pytest.raises(Forbidden, match="^invalid admin token$"):
        client.delete("sentiment")
    with Client(server.url, token=ADMIN) as client:
        with pytest.raises(NotFound, match="^task 'sentiment' has no version 99$"):
            client.activate("sentiment", 99)
        with pytest.raises(Invalid, match="not a safetensors file"):
            client.upload(b"not a bundle at all")
        with pytest.raises(TypeError, match="texts takes a list"):
            client.predict("sentiment", texts="one string")  # type: ignore[arg-type]  # caught before sending
        assert client.describe("sentiment").active_version == 1  # none of it changed anything


# --- retries ------------------------------------------------------------------------------------------------


def test_a_503_is_retried_to_success_after_retry_after(proxy):
    proxy.reset(fail=2, retry_after="1")
    with Client(proxy.url, retry=RetryPolicy(max_retries=3, jitter=0)) as client:
        t0 = time.monotonic()
        result = client.predict("sentiment", "a gripping film")
        elapsed = time.monotonic() - t0
    assert result.task == "sentiment" and isinstance(result.predictions[0], ClassificationPrediction)
    times = [t for _, _, t in proxy.seen]
    assert [(m, p) for m, p, _ in proxy.seen] == [("POST", "/predict/sentiment")] * 3
    assert all(b - a >= 0.95 for a, b in zip(times, times[1:])), times  # waited Retry-After each time
    assert 1.9 <= elapsed < 4.5


@pytest.mark.anyio
async def test_async_503_is_retried_and_retries_stop_at_max_retries(proxy, server, backbone_ref):
    proxy.reset(fail=1, retry_after="1")
    async with AsyncClient(proxy.url) as client:
        t0 = time.monotonic()
        result = await client.predict("ner", NER_TEXT)
        assert time.monotonic() - t0 >= 0.95 and len(proxy.seen) == 2
        assert isinstance(result.predictions[0], TokenClassificationPrediction)

    proxy.reset(fail=100, retry_after="0")
    async with AsyncClient(proxy.url, max_retries=2) as client:
        with pytest.raises(Unavailable) as err:
            await client.predict("sentiment", "x")
    assert (err.value.status, err.value.detail, err.value.retry_after) == (503, FlakyProxy.DETAIL, 0)
    assert len(proxy.seen) == 3  # the first request and two retries

    proxy.reset(fail=1, retry_after="3600")  # a wait over the cap is cut to the cap
    async with AsyncClient(proxy.url, retry=RetryPolicy(max_wait=0.2)) as client:
        t0 = time.monotonic()
        assert (await client.list()) and time.monotonic() - t0 < 2 and len(proxy.seen) == 2

    proxy.reset(fail=1, retry_after="0")  # an upload refused with 503 was not stored: retried, stored once
    async with AsyncClient(proxy.url, token=ADMIN) as client:
        up = await client.upload(bundle(backbone_ref, "retried", seed=3))
        assert up.version == 1 and [p for _, p, _ in proxy.seen] == ["/adapters", "/adapters"]
        assert (await client.describe("retried")).versions[-1].version == 1
        await client.delete("retried")


def test_broken_connections_are_retried_only_when_safe(proxy, backbone_ref):
    with Client(proxy.url, token=ADMIN, retry=RetryPolicy(backoff=0.01)) as client:
        proxy.reset(drop=1)  # predict is idempotent: retried after the connection broke
        assert client.predict("sentiment", "x").task == "sentiment" and len(proxy.seen) == 2
        proxy.reset(drop=1)  # an upload may have been stored: not retried
        with pytest.raises(ConnectionFailed, match="POST .*/adapters"):
            client.upload(bundle(backbone_ref, "dropped", seed=4))
        assert len(proxy.seen) == 1
        with pytest.raises(NotFound):
            client.describe("dropped")

    attempts = []

    class Counting(httpx.HTTPTransport):
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            attempts.append(request.url.path)
            return super().handle_request(request)

    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens: the connection is refused, nothing sent
    with Client(closed, token=ADMIN, retry=RetryPolicy(max_retries=2, backoff=0.01), transport=Counting()) as c:
        with pytest.raises(ConnectionFailed):
            c.upload(b"x")
        assert attempts == ["/adapters"] * 3  # refused connections sent nothing: even an upload retries
        attempts.clear()
        with pytest.raises(ConnectionFailed):
            c.ready()
        assert attempts == ["/readyz"]  # a probe reports at once


# --- the CLI ------------------------------------------------------------------------------------------------


def run_cli(*args: str, **env: str):
    return CliRunner().invoke(cli_app, list(args), env=env, catch_exceptions=False)


def test_cli_predict_one_text_and_a_jsonl_file(server, tmp_path):
    # the installed console script, end to end
    out = subprocess.run([str(VENV_BIN / "adapter-service"), "predict", "sentiment", "a gripping film"],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "ADAPTER_SERVICE_URL": server.url})
    assert out.returncode == 0, out.stderr
    single = json.loads(out.stdout)
    assert single["task"] == "sentiment" and single["predictions"][0]["label"] in LABELS[HeadType.CLASSIFICATION]

    r = run_cli("predict", "squad", "When was it built?", "--context", CONTEXT, "--url", server.url)
    assert r.exit_code == 0, r.stderr
    q = json.loads(r.stdout)["predictions"][0]
    assert q["answer"] == CONTEXT[q["start"]:q["end"]]
    r = run_cli("predict", "similarity", "a cat", "--pair", "a dog", "--url", server.url)
    assert r.exit_code == 0 and isinstance(json.loads(r.stdout)["predictions"][0]["value"], float)

    lines = [{"text": "good"}, {"text": "bad"}, {"text": "a cat", "text_pair": "a dog"}, {"text": "meh"},
             None, {"text": "fine"}]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(("" if x is None else json.dumps(x)) + "\n" for x in lines))
    dst = tmp_path / "out.jsonl"
    r = run_cli("predict", "sentiment", "--input", str(src), "--output", str(dst), "--batch-size", "2",
                "--url", server.url)
    assert r.exit_code == 0, r.stderr
    assert "5/5" in r.stderr  # the progress bar, on stderr
    got = [json.loads(x) for x in dst.read_text().splitlines()]
    assert len(got) == 5
    with Client(server.url) as client:  # in input order: each line as its own request answers the same
        for body, pred in zip([x for x in lines if x is not None], got):
            alone = client.predict_body("sentiment", body).predictions[0]
            assert isinstance(alone, ClassificationPrediction) and pred["label"] == alone.label
            assert pred["score"] == pytest.approx(alone.score, abs=1e-4)

    r = run_cli("predict", "ner", "--input", str(src), "--url", server.url)  # a pair line: the server's 422
    assert r.exit_code == 1
    assert r.stderr.strip().endswith(f"takes single texts: text pairs are not accepted ({src} lines 3-3)")
    assert len(r.stdout.splitlines()) == 2  # lines 1-2 answered before it
    src.write_text('{"text": "good"}\n["not", "an", "object"]\n')
    r = run_cli("predict", "sentiment", "--input", str(src), "--url", server.url, "--no-progress")
    assert r.exit_code == 1 and r.stderr == f"error: {src} line 2: expected a JSON object, got list\n"
    r = run_cli("predict", "nope", "x", "--url", server.url)
    assert r.exit_code == 1 and r.stderr == "error 404: unknown task 'nope'\n"


def test_cli_upload_list_activate_delete(server, backbone_ref, tmp_path):
    path = tmp_path / "cli-task.safetensors"
    path.write_bytes(bundle(backbone_ref, "cli-task", seed=21, head=HeadType.REGRESSION))
    env = {"ADAPTER_SERVICE_URL": server.url}
    r = run_cli("upload", str(path), **env)
    assert r.exit_code == 1 and r.stderr.startswith("error 401: missing admin token")
    for version in (1, 2):
        r = run_cli("upload", str(path), "--token", ADMIN, **env)
        assert r.exit_code == 0, r.stderr
        assert json.loads(r.stdout)["version"] == version and json.loads(r.stdout)["head_type"] == "regression"
    r = run_cli("activate", "cli-task", "1", ADAPTER_SERVICE_ADMIN_TOKEN=ADMIN, **env)
    assert r.exit_code == 0 and json.loads(r.stdout)["active_version"] == 1
    r = run_cli("list", **env)
    listed = {a["task"]: a for a in json.loads(r.stdout)["adapters"]}
    assert listed["cli-task"]["active_version"] == 1 and listed["cli-task"]["versions"] == [1, 2]
    r = run_cli("describe", "cli-task", **env)
    assert [v["active"] for v in json.loads(r.stdout)["versions"]] == [True, False]
    r = run_cli("activate", "cli-task", "7", "--token", ADMIN, **env)
    assert r.exit_code == 1 and r.stderr == "error 404: task 'cli-task' has no version 7\n"
    r = run_cli("delete", "cli-task", "--token", ADMIN, **env)
    assert r.exit_code == 0 and json.loads(r.stdout) == {"task": "cli-task", "deleted": True}
    r = run_cli("delete", "cli-task", "--token", ADMIN, **env)
    assert r.exit_code == 1 and r.stderr == "error 404: unknown task 'cli-task'\n"
