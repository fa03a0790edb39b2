"""The Open Inference Protocol (KServe v2 REST, /v2/...): in-process over ASGI for every head type, health,
metadata, errors in the protocol's shape, results equal to /predict's, rows sharing forwards with /predict;
then Triton's own HTTP client (`tritonclient.http`) against a real `adapter-service serve` process."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest

from service import __version__
from service.api.app import create_app
from service.runtime.runtime import Runtime
from service.settings import ServiceSettings
from tests.api.conftest import ADMIN, TASKS
from tests.conftest import LABELS

TEXT = "John Smith flew from Paris to Berlin."
CONTEXT = "The Eiffel Tower is a wrought-iron lattice tower in Paris, France, built in 1889."

# the same inputs as /predict bodies and as v2 input tensors, one case per head type (and pairs, batches)
CASES: list[tuple[str, dict[str, Any], dict[str, list[str]]]] = [
    ("sentiment", {"text": "a fine film"}, {"text": ["a fine film"]}),
    ("sentiment", {"texts": ["good", "bad", "a much longer sentence about nothing"]},
     {"text": ["good", "bad", "a much longer sentence about nothing"]}),
    ("sentiment", {"texts": ["he left", "prices rose"], "text_pairs": ["he went away", "prices fell"]},
     {"text": ["he left", "prices rose"], "text_pair": ["he went away", "prices fell"]}),
    ("topics", {"texts": ["the match and the election", "new phones"]},
     {"text": ["the match and the election", "new phones"]}),
    ("similarity", {"text": "a cat", "text_pair": "a dog"}, {"text": ["a cat"], "text_pair": ["a dog"]}),
    ("ner", {"texts": [TEXT, "Anna lives in Rome."]}, {"text": [TEXT, "Anna lives in Rome."]}),
    ("squad", {"questions": ["Where is the tower?", "When was it built?"], "contexts": [CONTEXT, CONTEXT]},
     {"question": ["Where is the tower?", "When was it built?"], "context": [CONTEXT, CONTEXT]}),
]

OUTPUTS = {
    "sentiment": [("label", "BYTES", [-1]), ("score", "FP32", [-1]), ("scores", "FP32", [-1, 2])],
    "topics": [("labels", "BYTES", [-1]), ("scores", "FP32", [-1, 3])],
    "similarity": [("value", "FP32", [-1])],
    "ner": [("entities", "BYTES", [-1])],
    "squad": [("answer", "BYTES", [-1]), ("start", "INT64", [-1]), ("end", "INT64", [-1]), ("score", "FP32", [-1])],
}
INPUTS = {"sentiment": ["text", "text_pair"], "topics": ["text", "text_pair"], "similarity": ["text", "text_pair"],
          "ner": ["text"], "squad": ["question", "context"]}

pytestmark = pytest.mark.anyio


def tensors(inputs: dict[str, list[str]], nested: bool = False) -> list[dict[str, Any]]:
    """v2 BYTES input tensors: shape [N] with flat data, or [N, 1] with nested data."""
    return [{"name": name, "datatype": "BYTES", "shape": [len(v), 1] if nested else [len(v)],
             "data": [[x] for x in v] if nested else v} for name, v in inputs.items()]


def as_predictions(task: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """v2 output tensors back into /predict's prediction dicts (the inverse of the documented layout)."""
    out = {o["name"]: o for o in body["outputs"]}
    n = out["truncated"]["shape"][0]
    for o in out.values():
        assert o["shape"][0] == n and len(o["data"]) == n * (o["shape"][1] if len(o["shape"]) == 2 else 1)
    labels = LABELS[TASKS[task]]
    preds: list[dict[str, Any]] = []
    for i in range(n):
        row = {name: o["data"][i] for name, o in out.items() if len(o["shape"]) == 1}
        p: dict[str, Any]
        if task == "sentiment":
            p = {"label": row["label"], "score": row["score"]}
        elif task == "topics":
            p = {"labels": json.loads(row["labels"])}
        elif task == "similarity":
            p = {"value": row["value"]}
        elif task == "ner":
            p = {"entities": json.loads(row["entities"])}
        else:
            p = {k: row[k] for k in ("answer", "start", "end", "score")}
        if "scores" in out:
            p["scores"] = dict(zip(labels, out["scores"]["data"][i * len(labels):(i + 1) * len(labels)]))
        if row["truncated"]:
            p["truncated"] = True
        preds.append(p)
    return preds


def assert_close(a: Any, b: Any, tol: float = 1e-5) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_close(a[k], b[k], tol)
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_close(x, y, tol)
    elif isinstance(a, float):
        assert a == pytest.approx(b, abs=tol)
    else:
        assert a == b


async def infer(client: httpx.AsyncClient, task: str, inputs: dict[str, list[str]], **body: Any) -> httpx.Response:
    return await client.post(f"/v2/models/{task}/infer", json={"inputs": tensors(inputs), **body})


# --- server: metadata, health ---------------------------------------------------------------------


async def test_server_metadata_live_and_ready(client):
    r = await client.get("/v2")
    assert r.status_code == 200
    assert r.json() == {"name": "adapter-service", "version": __version__, "extensions": []}
    r = await client.get("/v2/health/live")
    assert r.status_code == 200 and r.json() == {"live": True}
    r = await client.get("/v2/health/ready")
    assert r.status_code == 200 and r.json() == {"ready": True}


async def test_not_ready_is_503_in_the_protocols_error_shape(tiny_backbone, seeded_store, settings):
    app = create_app(Runtime(settings, backbone=tiny_backbone, store=seeded_store))  # never started
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
        assert (await c.get("/v2/health/live")).status_code == 200  # alive, not ready
        r = await c.get("/v2/health/ready")
        assert r.status_code == 503 and r.headers["retry-after"] == "5" and "not ready" in r.json()["error"]
        for r in [await c.get("/v2/models/sentiment"), await c.get("/v2/models/sentiment/ready"),
                  await infer(c, "sentiment", {"text": ["x"]})]:
            assert r.status_code == 503 and "starting" in r.json()["error"] and "detail" not in r.json()


# --- models: metadata, ready, versions -------------------------------------------------------------


@pytest.mark.parametrize("task", list(TASKS))
async def test_model_metadata_describes_the_head_types_tensors(client, task):
    r = await client.get(f"/v2/models/{task}")
    assert r.status_code == 200, r.text
    meta = r.json()
    assert meta["name"] == task and meta["versions"] == ["1"] and meta["platform"] == "adapter-service"
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == [
        (name, "BYTES", [-1]) for name in INPUTS[task]]
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["outputs"]] == [
        *OUTPUTS[task], ("truncated", "BOOL", [-1])]
    params = meta["parameters"]
    assert params["head_type"] == TASKS[task].value and json.loads(params["labels"]) == LABELS[TASKS[task]]
    assert params.get("optional_inputs") == ("text_pair" if "text_pair" in INPUTS[task] else None)
    assert (await client.get(f"/v2/models/{task}/versions/1")).json() == meta


async def test_model_ready_and_versions(client):
    for path in ["/v2/models/sentiment/ready", "/v2/models/sentiment/versions/1/ready"]:
        r = await client.get(path)
        assert r.status_code == 200 and r.json() == {"name": "sentiment", "ready": True}
    for path in ["/v2/models/sentiment/versions/2/ready", "/v2/models/sentiment/versions/2",
                 "/v2/models/sentiment/versions/latest"]:
        r = await client.get(path)
        assert r.status_code == 404 and "only its active version, 1" in r.json()["error"]
    r = await infer(client, "sentiment", {"text": ["x"]})
    assert r.json()["model_version"] == "1"
    r = await client.post("/v2/models/sentiment/versions/1/infer", json={"inputs": tensors({"text": ["x"]})})
    assert r.status_code == 200 and r.json()["model_version"] == "1"
    r = await client.post("/v2/models/sentiment/versions/2/infer", json={"inputs": tensors({"text": ["x"]})})
    assert r.status_code == 404 and "active version" in r.json()["error"]


@pytest.mark.parametrize("path", ["/v2/models/nope", "/v2/models/nope/ready", "/v2/models/nope/versions/1"])
async def test_unknown_model_is_404(client, path):
    r = await client.get(path)
    assert r.status_code == 404 and r.json() == {"error": "unknown task 'nope'"}


async def test_unknown_or_invalid_model_infer_is_404(client):
    r = await infer(client, "nope", {"text": ["x"]})
    assert r.status_code == 404 and r.json() == {"error": "unknown task 'nope'"}
    r = await infer(client, "Bad..Name", {"text": ["x"]})
    assert r.status_code == 404 and "invalid task name" in r.json()["error"]


# --- inference ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("task, body, inputs", CASES)
async def test_infer_equals_predict_for_every_head_type(client, task, body, inputs):
    expected = (await client.post(f"/predict/{task}", json=body)).json()["predictions"]
    for nested in (False, True):
        r = await client.post(f"/v2/models/{task}/infer", json={"id": "req-7", "inputs": tensors(inputs, nested)})
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["model_name"] == task and out["model_version"] == "1" and out["id"] == "req-7"
        assert [o["name"] for o in out["outputs"]] == [name for name, _, _ in OUTPUTS[task]] + ["truncated"]
        for o in out["outputs"]:
            kind = dict((n, d) for n, d, _ in OUTPUTS[task]).get(o["name"], "BOOL")
            assert o["datatype"] == kind
        assert_close(as_predictions(task, out), expected)


async def test_truncated_output_and_a_generated_id(client):
    long = " ".join(["a"] * 200)  # under the character limit, over the tiny model's 128 positions
    r = await infer(client, "sentiment", {"text": [long, "short"]})
    out = {o["name"]: o for o in r.json()["outputs"]}
    assert out["truncated"]["data"] == [True, False]
    assert isinstance(r.json()["id"], str) and r.json()["id"]  # none given: the server names the request


async def test_outputs_select_and_order_the_answer(client):
    r = await infer(client, "sentiment", {"text": ["good", "bad"]}, outputs=[{"name": "scores"}, {"name": "label"}])
    assert r.status_code == 200
    outputs = r.json()["outputs"]
    assert [o["name"] for o in outputs] == ["scores", "label"]
    assert outputs[0]["shape"] == [2, 2] and len(outputs[0]["data"]) == 4 and outputs[1]["shape"] == [2]
    # outputs asked for in binary (the binary tensor extension) are answered as JSON tensors
    r = await infer(client, "squad", {"question": ["where?"], "context": [CONTEXT]},
                    outputs=[{"name": "answer", "parameters": {"binary_data": True}}],
                    parameters={"binary_data_output": True})
    assert r.status_code == 200 and r.json()["outputs"][0]["data"][0] in CONTEXT


@pytest.mark.parametrize(
    "task, body, status, words",
    [
        ("sentiment", {"inputs": [{"name": "text", "shape": [1], "datatype": "FP32", "data": [1.0]}]}, 400,
         "datatype FP32; it must be BYTES"),
        ("sentiment", {"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["a", "b", "c"]}]}, 400,
         "shape [2] (2 elements) but 3 elements"),
        ("sentiment", {"inputs": [{"name": "text", "shape": [1, 2], "datatype": "BYTES", "data": [["a", "b"]]}]}, 400,
         "must be [N] or [N, 1]"),
        ("sentiment", {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [5]}]}, 400,
         "element 0 is int, not a string"),
        ("sentiment", {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [["a", ["b"]]]}]}, 400,
         "not a string"),
        ("sentiment", {"inputs": [{"name": "sentence", "shape": [1], "datatype": "BYTES", "data": ["a"]}]}, 400,
         "no input 'sentence'; its inputs are text, text_pair (optional)"),
        ("sentiment", {"inputs": []}, 400, "missing input 'text'"),
        ("sentiment", {"inputs": [{"name": "text_pair", "shape": [1], "datatype": "BYTES", "data": ["a"]}]}, 400,
         "missing input 'text'"),
        ("sentiment", {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a"]}] * 2}, 400,
         "given more than once"),
        ("squad", {"inputs": [{"name": "question", "shape": [1], "datatype": "BYTES", "data": ["q"]}]}, 400,
         "missing input 'context'"),
        ("ner", {"inputs": tensors({"text": ["a"], "text_pair": ["b"]})}, 400, "no input 'text_pair'"),
        ("sentiment", {"inputs": tensors({"text": ["a"]}), "outputs": [{"name": "logits"}]}, 400,
         "no output 'logits'; its outputs are label, score, scores, truncated"),
        ("sentiment", {"inputs": tensors({"text": ["a"]}), "outputs": [{"name": "label"}] * 2}, 400,
         "more than once"),
        ("sentiment", {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES"}]}, 400, "inputs.0.data"),
        ("sentiment", {"inputs": [{"name": "text", "shape": [-1], "datatype": "BYTES", "data": []}]}, 400,
         "inputs.0.shape.0"),
        ("sentiment", {"text": "a"}, 400, "inputs: field required"),
        # /predict's own checks and messages, through the PredictRequest the tensors become
        ("sentiment", {"inputs": tensors({"text": [""]})}, 400, "'text' is empty"),
        ("sentiment", {"inputs": tensors({"text": ["ok", " "]})}, 400, "'texts[1]' is empty"),
        ("sentiment", {"inputs": tensors({"text": []})}, 400, "'texts' must not be empty"),
        ("sentiment", {"inputs": tensors({"text": ["a"] * 9})}, 400, "at most 8"),
        ("sentiment", {"inputs": tensors({"text": ["a", "b"], "text_pair": ["c"]})}, 400, "'text_pairs' has 1"),
        ("sentiment", {"inputs": tensors({"text": ["x" * 501]})}, 413, "'text' has 501 characters; the limit is 500"),
        ("squad", {"inputs": tensors({"question": ["q"], "context": ["x" * 501]})}, 413, "'context'"),
    ],
)
async def test_bad_requests_say_what_is_wrong(client, task, body, status, words):
    r = await client.post(f"/v2/models/{task}/infer", json=body)
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error"} and words.lower() in r.json()["error"].lower()


async def test_limits_and_messages_equal_predicts(client):
    for body, inputs in [({"text": ""}, {"text": [""]}), ({"texts": ["a"] * 9}, {"text": ["a"] * 9}),
                         ({"text": "x" * 501}, {"text": ["x" * 501]})]:
        predict = await client.post("/predict/sentiment", json=body)
        v2 = await infer(client, "sentiment", inputs)
        assert v2.json()["error"] == predict.json()["detail"]
        assert (predict.status_code, v2.status_code) in {(422, 400), (413, 413)}


async def test_body_is_json_whatever_its_content_type_and_malformed_json_is_400(client):
    body = json.dumps({"inputs": tensors({"text": ["good"]})}).encode()
    for headers in ({}, {"content-type": "text/plain"}, {"content-type": "application/x-www-form-urlencoded"}):
        r = await client.post("/v2/models/sentiment/infer", content=body, headers=headers)
        assert r.status_code == 200, (headers, r.text)
    r = await client.post("/v2/models/sentiment/infer", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "invalid json" in r.json()["error"].lower()


async def test_binary_tensor_extension_is_refused_clearly(client):
    r = await client.post("/v2/models/sentiment/infer", content=b'{"inputs": []}\x00\x00\x00\x01a',
                          headers={"Inference-Header-Content-Length": "14"})
    assert r.status_code == 400 and "binary tensor data extension" in r.json()["error"]
    tensor = {"name": "text", "shape": [1], "datatype": "BYTES", "data": [], "parameters": {"binary_data_size": 5}}
    r = await client.post("/v2/models/sentiment/infer", json={"inputs": [tensor]})
    assert r.status_code == 400 and "binary tensor data extension" in r.json()["error"]


async def test_overloaded_is_503_with_retry_after(client, monkeypatch):
    svc = client.app.state.svc
    svc.batcher.queue_limit = 1
    real_run = svc.engine.run

    def slow_run(*a, **k):
        time.sleep(0.2)
        return real_run(*a, **k)

    monkeypatch.setattr(svc.engine, "run", slow_run)
    rs = await asyncio.gather(*(infer(client, "sentiment", {"text": [f"t{i}"]}) for i in range(10)))
    busy = [r for r in rs if r.status_code == 503]
    assert busy and {r.status_code for r in rs} <= {200, 503}
    assert busy[0].headers["retry-after"] == "1" and "queue is full" in busy[0].json()["error"]


async def test_v2_and_predict_rows_share_forwards(one_worker_client, monkeypatch):
    """Requests of both APIs and several tasks, queued while a forward runs: the next forward mixes them."""
    c = one_worker_client
    svc = c.app.state.svc
    real_run = svc.engine.run
    batches: list[list[str | None]] = []
    release = threading.Event()

    def recording_run(requests, *a, **k):
        batches.append([r.task for r in requests])
        if len(batches) == 1:
            release.wait(10)  # the first forward runs until the others are queued
        return real_run(requests, *a, **k)

    async def until(condition):
        for _ in range(500):
            if condition():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("timed out")

    monkeypatch.setattr(svc.engine, "run", recording_run)
    first = asyncio.create_task(c.post("/predict/similarity", json={"text": "a", "text_pair": "b"}))
    await until(lambda: len(batches) == 1)
    rest = asyncio.gather(
        c.post("/predict/sentiment", json={"text": "good"}), infer(c, "ner", {"text": [TEXT]}),
        infer(c, "sentiment", {"text": ["bad"]}), c.post("/predict/topics", json={"text": "the vote"}),
    )
    await until(lambda: svc.batcher.depth == 4)
    release.set()
    rs = await rest
    assert (await first).status_code == 200 and all(r.status_code == 200 for r in rs)
    assert batches[0] == ["similarity"] and sorted(batches[1]) == ["ner", "sentiment", "sentiment", "topics"], batches


# --- auth, metrics, OpenAPI ----------------------------------------------------------------------------


@asynccontextmanager
async def app_client(tiny_backbone, seeded_store, **settings: Any) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(Runtime(ServiceSettings(admin_token=ADMIN, max_wait_ms=2, **settings), backbone=tiny_backbone,
                             store=seeded_store))
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        c.app = app
        yield c


@pytest.fixture
async def one_worker_client(tiny_backbone, seeded_store) -> AsyncIterator[httpx.AsyncClient]:
    async with app_client(tiny_backbone, seeded_store, forward_workers=1) as c:
        yield c


@pytest.fixture
async def keyed_client(tiny_backbone, seeded_store) -> AsyncIterator[httpx.AsyncClient]:
    async with app_client(tiny_backbone, seeded_store, api_key="k-123", forward_workers=1) as c:
        yield c


async def test_api_key_guards_models_not_health(keyed_client):
    """The same dependency as /predict: the same statuses and messages, in the protocol's error shape."""
    c = keyed_client
    for path in ["/v2", "/v2/health/live", "/v2/health/ready"]:
        assert (await c.get(path)).status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        predict = await c.post("/predict/sentiment", json={"text": "x"}, headers=headers)
        assert predict.status_code in (401, 403)
        for r in [await c.get("/v2/models/sentiment", headers=headers),
                  await c.get("/v2/models/sentiment/ready", headers=headers),
                  await c.post("/v2/models/sentiment/infer", json={"inputs": tensors({"text": ["x"]})}, headers=headers)]:
            assert r.status_code == predict.status_code and r.json() == {"error": predict.json()["detail"]}
            assert r.headers.get("www-authenticate") == predict.headers.get("www-authenticate")
    r = await c.post("/v2/models/sentiment/infer", json={"inputs": tensors({"text": ["x"]})},
                     headers={"Authorization": "Bearer k-123"})
    assert r.status_code == 200


async def test_infer_requests_are_counted_like_predicts(client):
    await infer(client, "sentiment", {"text": ["x"]})
    await infer(client, "sentiment", {"text": [""]})
    await infer(client, "nope", {"text": ["x"]})
    metrics = (await client.get("/metrics")).text
    for task, status in [("sentiment", 200), ("sentiment", 400), ("_unknown", 404)]:
        assert f'adapter_service_requests_total{{status="{status}",task="{task}"}} 1.0' in metrics


async def test_openapi_declares_the_v2_routes_and_their_errors(client):
    spec = (await client.get("/openapi.json")).json()
    paths = spec["paths"]
    for path in ["/v2", "/v2/health/live", "/v2/health/ready", "/v2/models/{task}", "/v2/models/{task}/ready",
                 "/v2/models/{task}/versions/{version}", "/v2/models/{task}/versions/{version}/ready",
                 "/v2/models/{task}/infer", "/v2/models/{task}/versions/{version}/infer"]:
        assert path in paths, path
        for op in paths[path].values():
            assert "422" not in op["responses"]  # errors are the protocol's 400s, never FastAPI's 422
            for status, resp in op["responses"].items():
                if status != "200":
                    assert resp["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/OipError"}
            names = [p["name"] for p in op.get("parameters", [])]
            assert names == [n for n in ("task", "version") if "{" + n + "}" in path]
    infer_op = paths["/v2/models/{task}/infer"]["post"]
    assert set(infer_op["responses"]) == {"200", "400", "401", "403", "404", "413", "503"}
    assert set(infer_op["responses"]["503"]["headers"]) == {"Retry-After"}
    assert set(infer_op["responses"]["401"]["headers"]) == {"WWW-Authenticate"}
    assert infer_op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("InferenceResponse")
    body = infer_op["requestBody"]["content"]["application/json"]
    assert body["schema"]["required"] == ["inputs"] and "$ref" not in json.dumps(body["schema"])
    assert set(body["examples"]) >= {"text", "qa"}


# --- a real client of the protocol against a real server process ------------------------------------


def test_tritonclient_http_against_a_real_server(server):
    """Triton's HTTP client, unchanged: health, metadata, and inference with BYTES tensors (numpy object
    arrays) for every head type, equal to /predict; errors surface as InferenceServerException."""
    import numpy as np
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    client = triton.InferenceServerClient(url=server.url.removeprefix("http://"), network_timeout=60)
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.get_server_metadata()["name"] == "adapter-service"
        assert client.is_model_ready("sentiment") and client.is_model_ready("sentiment", model_version="1")
        assert not client.is_model_ready("nope")

        meta = client.get_model_metadata("squad")
        assert [i["name"] for i in meta["inputs"]] == ["question", "context"]

        for task, body, inputs in CASES:
            infer_inputs = []
            for name, values in inputs.items():
                tensor = triton.InferInput(name, [len(values), 1], "BYTES")
                tensor.set_data_from_numpy(np.array(values, dtype=object).reshape(-1, 1), binary_data=False)
                infer_inputs.append(tensor)
            # default outputs: the client asks for them in binary; they come back as JSON, read the same way
            result = client.infer(task, infer_inputs, request_id="r1")
            response = result.get_response()
            assert response["model_name"] == task and response["id"] == "r1"
            expected = httpx.post(f"{server.url}/predict/{task}", json=body).json()["predictions"]
            assert_close(as_predictions(task, response), expected)
            n = len(next(iter(inputs.values())))
            assert result.as_numpy("truncated").shape == (n,) and result.as_numpy("truncated").dtype == np.bool_
            if task == "sentiment":
                assert result.as_numpy("scores").shape == (n, 2)
                assert list(result.as_numpy("label")) == [p["label"] for p in expected]  # JSON BYTES: str

        only = client.infer("squad", [_bytes_input(triton, "question", ["Where is it?"]),
                                      _bytes_input(triton, "context", [CONTEXT])],
                            outputs=[triton.InferRequestedOutput("answer", binary_data=False)])
        assert [o["name"] for o in only.get_response()["outputs"]] == ["answer"]

        with pytest.raises(InferenceServerException) as err:
            client.infer("nope", [_bytes_input(triton, "text", ["x"])])
        assert err.value.status() == "404" and "unknown task 'nope'" in err.value.message()
        with pytest.raises(InferenceServerException) as err:
            client.infer("sentiment", [_bytes_input(triton, "text", [""])])
        assert err.value.status() == "400" and "'text' is empty" in err.value.message()
        binary = triton.InferInput("text", [1], "BYTES")
        binary.set_data_from_numpy(np.array(["x"], dtype=object))  # the client's default: binary tensor data
        with pytest.raises(InferenceServerException) as err:
            client.infer("sentiment", [binary])
        assert err.value.status() == "400" and "binary tensor data extension" in err.value.message()
    finally:
        client.close()


def _bytes_input(triton: Any, name: str, values: list[str]) -> Any:
    import numpy as np

    tensor = triton.InferInput(name, [len(values)], "BYTES")
    tensor.set_data_from_numpy(np.array(values, dtype=object), binary_data=False)
    return tensor
