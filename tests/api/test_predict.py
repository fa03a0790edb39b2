"""POST /predict/{task}: every body shape, every head type, every error status."""

from __future__ import annotations

import asyncio

import pytest

pytestmark = pytest.mark.anyio

TEXT = "John Smith flew from Paris to Berlin."


@pytest.mark.parametrize(
    "task, body, n",
    [
        ("sentiment", {"text": "a fine film"}, 1),
        ("sentiment", {"text": "he left", "text_pair": "he went away"}, 1),
        ("sentiment", {"texts": ["good", "bad", "ugly"]}, 3),
        ("sentiment", {"texts": ["a", "b"], "text_pairs": ["c", "d"]}, 2),
        ("topics", {"text": "the match and the election"}, 1),
        ("similarity", {"text": "a cat", "text_pair": "a dog"}, 1),
        ("ner", {"text": TEXT}, 1),
        ("ner", {"texts": [TEXT, "Anna lives in Rome."]}, 2),
        ("squad", {"question": "Where did John fly to?", "context": TEXT}, 1),
        ("squad", {"questions": ["Who flew?", "From where?"], "contexts": [TEXT, TEXT]}, 2),
    ],
)
async def test_every_body_shape_and_head_type(client, task, body, n):
    r = await client.post(f"/predict/{task}", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["task"] == task and out["version"] == 1 and len(out["predictions"]) == n
    p = out["predictions"][0]
    if task == "sentiment":
        assert p["label"] in p["scores"] and p["score"] == max(p["scores"].values())
        assert set(p["scores"]) == {"negative", "positive"}
    elif task == "topics":
        assert set(p["scores"]) == {"sports", "politics", "tech"} and isinstance(p["labels"], list)
        assert all(p["scores"][label] >= 0.5 for label in p["labels"])
    elif task == "similarity":
        assert isinstance(p["value"], float)
    elif task == "ner":
        for e in p["entities"]:
            assert e["entity"] in {"PER", "LOC"} and body.get("text", body.get("texts", [""])[0])[e["start"]:e["end"]] == e["text"]
    else:
        context = body.get("context") or body["contexts"][0]
        assert context[p["start"] : p["end"]] == p["answer"] and 0 <= p["score"] <= 1


async def test_truncated_input_is_flagged(client):
    long = " ".join(["a"] * 200)  # 399 characters (under the limit), 202 tokens (over the 128 positions)
    r = await client.post("/predict/sentiment", json={"text": long})
    assert r.status_code == 200 and r.json()["predictions"][0]["truncated"] is True
    r = await client.post("/predict/sentiment", json={"text": "short"})
    assert "truncated" not in r.json()["predictions"][0]


@pytest.mark.parametrize(
    "task, body, status, words",
    [
        ("nope", {"text": "x"}, 404, "unknown task 'nope'"),
        ("Bad..Name", {"text": "x"}, 404, "invalid task name"),
        ("sentiment", {"text": ""}, 422, "'text' is empty"),
        ("sentiment", {"text": "   "}, 422, "'text' is empty"),
        ("sentiment", {"texts": []}, 422, "must not be empty"),
        ("sentiment", {"texts": ["ok", ""]}, 422, "'texts[1]' is empty"),
        ("sentiment", {}, 422, "got {nothing}"),
        ("sentiment", {"text": "a", "texts": ["b"]}, 422, "body must be one of"),
        ("sentiment", {"text": "a", "bogus": 1}, 422, "bogus"),
        ("sentiment", {"text": 5}, 422, "text"),
        ("sentiment", {"texts": ["a"] * 9}, 422, "at most 8"),
        ("sentiment", {"texts": ["a", "b"], "text_pairs": ["c"]}, 422, "'text_pairs' has 1"),
        ("sentiment", {"question": "q", "context": "c"}, 422, "not question answering"),
        ("ner", {"text": "a", "text_pair": "b"}, 422, "text pairs are not accepted"),
        ("squad", {"text": "a"}, 422, "answers questions"),
        ("sentiment", {"text": "x" * 501}, 413, "limit is 500"),
        ("squad", {"question": "q", "context": "x" * 501}, 413, "'context'"),
    ],
)
async def test_errors_say_what_is_wrong(client, task, body, status, words):
    r = await client.post(f"/predict/{task}", json=body)
    assert r.status_code == status, r.text
    assert isinstance(r.json()["detail"], str)
    assert words.lower() in r.json()["detail"].lower()


async def test_malformed_json_is_422(client):
    r = await client.post("/predict/sentiment", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and isinstance(r.json()["detail"], str)


async def test_full_queue_answers_503_with_retry_after(client, monkeypatch):
    svc = client.app.state.svc
    svc.batcher.queue_limit = 2
    real_run = svc.engine.run

    def slow_run(*a, **k):
        import time

        time.sleep(0.2)
        return real_run(*a, **k)

    monkeypatch.setattr(svc.engine, "run", slow_run)
    responses = await asyncio.gather(*(client.post("/predict/sentiment", json={"text": f"t{i}"}) for i in range(12)))
    codes = [r.status_code for r in responses]
    assert 200 in codes and 503 in codes and set(codes) <= {200, 503}
    busy = next(r for r in responses if r.status_code == 503)
    assert busy.headers["retry-after"] == "1" and "queue is full" in busy.json()["detail"]


async def test_concurrent_mixed_task_requests_equal_one_by_one(client):
    bodies = [
        ("sentiment", {"text": "a fine film"}), ("ner", {"text": TEXT}), ("similarity", {"text": "a", "text_pair": "b"}),
        ("topics", {"texts": ["x y z", "the vote"]}), ("squad", {"question": "Who?", "context": TEXT}),
        ("sentiment", {"texts": ["good", "a much longer sentence about nothing in particular at all"]}),
    ] * 4
    sequential = [(await client.post(f"/predict/{t}", json=b)).json() for t, b in bodies]
    concurrent = await asyncio.gather(*(client.post(f"/predict/{t}", json=b) for t, b in bodies))
    for seq, con in zip(sequential, concurrent):
        assert con.status_code == 200
        assert_close_json(con.json(), seq)
    # and they really shared forwards: fewer batches than requests
    metrics = (await client.get("/metrics")).text
    assert "adapter_service_batch_tasks_bucket" in metrics


def assert_close_json(a, b, tol: float = 1e-5):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_close_json(a[k], b[k], tol)
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_close_json(x, y, tol)
    elif isinstance(a, float):
        assert a == pytest.approx(b, abs=tol)
    else:
        assert a == b


async def test_embed_returns_unit_vectors(client):
    r = await client.post("/embed", json={"texts": ["hello", "world"]})
    assert r.status_code == 200
    embs = r.json()["embeddings"]
    assert len(embs) == 2 and len(embs[0]) == 32
    assert sum(x * x for x in embs[0]) == pytest.approx(1.0, abs=1e-5)
    assert (await client.post("/embed", json={"texts": [""]})).status_code == 422
