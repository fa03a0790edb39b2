"""Per-task API keys: allowed, forbidden (403), unknown (401), a rotated file picked up without a restart."""

from __future__ import annotations

import json
import os
import subprocess

import httpx
import pytest

from service.api import keys as keys_module
from service.api.app import create_app
from service.api.keys import hash_key, parse_keys
from service.errors import ConfigurationError
from service.runtime.runtime import Runtime
from tests.api.conftest import AUTH
from tests.procs import VENV_BIN

pytestmark = pytest.mark.anyio

READER, TAGGER = "reader-key-123", "tagger-key-456"


def write_keys(path, *entries):
    path.write_text(json.dumps({"keys": [{"name": n, "sha256": hash_key(k), "tasks": t} for n, k, t in entries]}))


@pytest.fixture
async def keyed(tmp_path, tiny_backbone, seeded_store, settings, monkeypatch):
    monkeypatch.setattr(keys_module, "RECHECK_S", 0.0)  # re-read on every use: no sleeping in tests
    path = tmp_path / "keys.json"
    write_keys(path, ("reader", READER, ["sentiment", "simi*"]), ("tagger", TAGGER, ["ner"]))
    app = create_app(Runtime(settings.model_copy(update={"api_keys_file": path}), backbone=tiny_backbone,
                             store=seeded_store))
    async with app.router.lifespan_context(app), \
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
        yield c, path


def bearer(key):
    return {"Authorization": f"Bearer {key}"}


async def test_a_key_calls_its_tasks_and_only_those(keyed):
    client, _ = keyed
    assert (await client.post("/predict/sentiment", json={"text": "good"}, headers=bearer(READER))).status_code == 200
    assert (await client.post("/predict/similarity", json={"text": "a", "text_pair": "b"},
                              headers=bearer(READER))).status_code == 200  # by glob
    r = await client.post("/predict/ner", json={"text": "Paris"}, headers=bearer(READER))
    assert r.status_code == 403 and r.json()["detail"] == "this API key may not call task 'ner'"
    assert (await client.get("/adapters/ner", headers=bearer(READER))).status_code == 403
    assert (await client.post("/predict/ner", json={"text": "Paris"}, headers=bearer(TAGGER))).status_code == 200
    listed = (await client.get("/adapters", headers=bearer(READER))).json()["adapters"]
    assert sorted(a["task"] for a in listed) == ["sentiment", "similarity"]
    assert (await client.post("/embed", json={"texts": ["x"]}, headers=bearer(TAGGER))).status_code == 200


async def test_unknown_and_missing_keys_are_401_and_the_admin_token_passes(keyed):
    client, _ = keyed
    r = await client.post("/predict/sentiment", json={"text": "good"}, headers=bearer("not-a-key"))
    assert r.status_code == 401 and r.json()["detail"] == "unknown API key" and r.headers["www-authenticate"] == "Bearer"
    r = await client.post("/predict/sentiment", json={"text": "good"})
    assert r.status_code == 401 and "missing API key" in r.json()["detail"]
    assert (await client.post("/predict/ner", json={"text": "Paris"}, headers=AUTH)).status_code == 200
    assert (await client.get("/healthz")).status_code == 200  # probes stay open
    # a key is not an admin token
    assert (await client.delete("/adapters/sentiment", headers=bearer(READER))).status_code == 403


async def test_a_rotated_file_is_picked_up_without_a_restart_and_a_broken_one_changes_nothing(keyed, caplog):
    client, path = keyed
    write_keys(path, ("reader", "rotated-key-789", ["sentiment"]))
    assert (await client.post("/predict/sentiment", json={"text": "x"}, headers=bearer(READER))).status_code == 401
    assert (await client.post("/predict/sentiment", json={"text": "x"},
                              headers=bearer("rotated-key-789"))).status_code == 200
    assert (await client.post("/predict/ner", json={"text": "x"}, headers=bearer(TAGGER))).status_code == 401
    path.write_text("{not json")  # a bad edit: the keys read before stay in force
    assert (await client.post("/predict/sentiment", json={"text": "x"},
                              headers=bearer("rotated-key-789"))).status_code == 200
    assert "API key file not reloaded" in caplog.text


@pytest.mark.parametrize("text,problem", [
    ("[]", "expected"), ('{"keys": [{"name": "a", "sha256": "xyz", "tasks": ["t"]}]}', "64 lowercase hex"),
    ('{"keys": [{"name": "a", "sha256": "' + "0" * 64 + '", "tasks": []}]}', "non-empty list"),
    ('{"keys": [{"name": "a", "sha256": "' + "0" * 64 + '", "tasks": ["t"], "key": "plain"}]}', "expected an object"),
])
def test_invalid_key_files_are_refused_with_the_problem(text, problem):
    with pytest.raises(ConfigurationError, match=problem):
        parse_keys(text, "keys.json")


def test_a_key_file_that_cannot_be_read_stops_the_start(tmp_path, settings, tiny_backbone, seeded_store):
    with pytest.raises(ConfigurationError, match="API key file"):
        create_app(Runtime(settings.model_copy(update={"api_keys_file": tmp_path / "missing.json"}),
                           backbone=tiny_backbone, store=seeded_store))


def test_the_cli_makes_keys_storing_only_their_hashes(tmp_path):
    path = tmp_path / "keys.json"
    run = lambda *a: subprocess.run([str(VENV_BIN / "adapter-service"), "keys", *a, "--file", str(path)],  # noqa: E731
                                    capture_output=True, text=True, timeout=60)
    out = run("add", "reviews", "--tasks", "sst2, reviews-*")
    assert out.returncode == 0, out.stderr
    key = out.stdout.strip()
    stored = json.loads(path.read_text())["keys"]
    assert stored == [{"name": "reviews", "sha256": hash_key(key), "tasks": ["sst2", "reviews-*"]}]
    assert key not in path.read_text() and oct(os.stat(path).st_mode)[-3:] == "600"
    assert run("add", "reviews", "--tasks", "x").returncode == 1  # names are unique
    assert run("list").stdout.strip() == "reviews\tsst2,reviews-*"
    before = path.read_text()
    refused = run("add", "empty", "--tasks", " , ")  # no task at all: the service would refuse the file
    assert refused.returncode == 1 and "'tasks' must be a non-empty list" in refused.stderr
    assert path.read_text() == before  # a refused edit leaves the file as it was
    assert run("remove", "reviews").returncode == 0 and json.loads(path.read_text())["keys"] == []
    path.write_text("{not json")
    for args in (("list",), ("add", "x", "--tasks", "sst2"), ("remove", "x")):
        out = run(*args)
        assert out.returncode == 1 and "not JSON" in out.stderr and "Traceback" not in out.stderr, args
    assert path.read_text() == "{not json"
