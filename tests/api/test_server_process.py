"""A real `adapter-service serve` process (uvicorn) and the CLI client commands against it."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import httpx

from tests.api.conftest import ADMIN
from tests.conftest import make_bundle, make_manifest
from tests.procs import VENV_BIN


def cli(*args: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "adapter-service"), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


def test_real_server_predicts_uploads_and_shuts_down_cleanly(server, tmp_path, tiny_backbone):
    r = httpx.post(server.url + "/predict/sentiment", json={"texts": ["good", "bad"]})
    assert r.status_code == 200 and r.json()["version"] == 1 and len(r.json()["predictions"]) == 2

    bundle = tmp_path / "sentiment-v2.safetensors"
    bundle.write_bytes(make_bundle(make_manifest(tiny_backbone.ref, task="sentiment"), seed=42))
    out = cli("inspect", str(bundle))
    assert out.returncode == 0 and json.loads(out.stdout)["task"] == "sentiment"

    out = cli("upload", str(bundle), "--url", server.url, "--token", "wrong")
    assert out.returncode == 1 and "error 403" in out.stderr
    out = cli("upload", str(bundle), "--url", server.url, ADAPTER_SERVICE_ADMIN_TOKEN=ADMIN)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["version"] == 2
    assert httpx.post(server.url + "/predict/sentiment", json={"text": "good"}).json()["version"] == 2

    out = cli("list", "--url", server.url)
    listing = {a["task"]: a for a in json.loads(out.stdout)["adapters"]}
    assert listing["sentiment"]["active_version"] == 2 and set(listing) >= {"ner", "squad"}

    # graceful: uvicorn drains, runs the app's shutdown, then re-raises SIGTERM as its exit status
    assert server.stop(signal.SIGTERM) in (0, -signal.SIGTERM)
    log = server.log_tail(200)
    assert "Application shutdown complete." in log
    assert ADMIN not in log and "generated admin token" not in log  # a configured token is never logged
