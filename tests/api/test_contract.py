"""The published OpenAPI is what the server answers: schemathesis (every check, stateful phase included)
against a live `adapter-service serve` on a tiny backbone seeded with one task per head type.

Bounded for `make test`: a fixed seed and example budget (tests/api/contract/schemathesis.toml). Where the
server is right and the schema cannot say more, that file declares the expected statuses per operation,
each with its reason; no check is switched off. A second run against a deliberately wrong copy of the
schema proves the run can fail.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import httpx
import pytest

from service.bundles.manifest import AdapterConfig, HeadType
from tests.api.conftest import ADMIN, tiny_server
from tests.conftest import make_bundle, make_manifest
from tests.procs import VENV_BIN

pytestmark = pytest.mark.integration

CONTRACT = Path(__file__).parent / "contract"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def live_server(tmp_path, tiny_model_dirs, tiny_backbone, seeded_store):
    bundles = tmp_path / "bundles"
    bundles.mkdir()
    for i, (task, head) in enumerate([("sentiment", HeadType.CLASSIFICATION), ("fuzzed", HeadType.REGRESSION),
                                      ("fuzzed-tags", HeadType.TOKEN_CLASSIFICATION)]):
        manifest = make_manifest(tiny_backbone.ref, task=task, head_type=head, adapter=AdapterConfig(bottleneck=8))
        (bundles / f"{task}.safetensors").write_bytes(make_bundle(manifest, seed=100 + i))
    with tiny_server(tiny_model_dirs["bert"], seeded_store.root, tmp_path / "server.log",
                     ADAPTER_SERVICE_MAX_ITEMS_PER_REQUEST="8", ADAPTER_SERVICE_MAX_TEXT_CHARS="200") as proc:
        yield proc, bundles


def schemathesis(schema: str, url: str, bundles: Path, report: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.api.contract.hooks", "CONTRACT_BUNDLES": str(bundles),
           "PYTHONPATH": str(ROOT), "NO_COLOR": "1"}
    return subprocess.run(
        [str(VENV_BIN / "schemathesis"), "--config-file", str(CONTRACT / "schemathesis.toml"), "run", schema,
         "--url", url, "--checks", "all", "-H", f"Authorization: Bearer {ADMIN}", "--workers", "1",
         "--report", "ndjson", "--report-ndjson-path", str(report), *extra],
        capture_output=True, text=True, timeout=600, env=env, cwd=ROOT,
    )


def test_the_published_schema_holds_under_fuzzing_and_stateful_runs(live_server, tmp_path):
    server, bundles = live_server
    out = schemathesis(server.url + "/openapi.json", server.url, bundles, tmp_path / "events.ndjson")
    (Path(os.environ.get("CONTRACT_LOG", tmp_path)) / "schemathesis.log").write_text(out.stdout)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    # it really ran: every phase passed, and the stateful phase followed the upload's links
    text = out.stdout
    for phase in ("Examples", "Coverage", "Fuzzing", "Stateful"):
        assert f"✅ {phase}" in text, text[-3000:]
    covered = re.search(r"API Links:\s+(\d+) covered", text)
    assert covered and int(covered.group(1)) >= 4, text[-3000:]
    generated = re.search(r"(\d+) generated, (\d+) passed", text)
    assert generated and int(generated.group(1)) == int(generated.group(2)) > 500, text[-3000:]


def test_a_wrong_schema_fails_the_run(live_server, tmp_path):
    """The same run against a copy of the schema in which /healthz promises an integer status must fail."""
    server, bundles = live_server
    schema = httpx.get(server.url + "/openapi.json").json()
    schema["components"]["schemas"]["HealthResponse"]["properties"]["status"] = {"type": "integer"}
    wrong = tmp_path / "wrong-openapi.json"
    wrong.write_text(json.dumps(schema))
    out = schemathesis(str(wrong), server.url, bundles, tmp_path / "events.ndjson",
                       "--include-path", "/healthz", "--phases", "examples,coverage,fuzzing")
    assert out.returncode != 0, out.stdout[-3000:]
    assert "Response violates schema" in out.stdout, out.stdout[-3000:]
