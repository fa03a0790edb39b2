"""The README documents every setting (and nothing that no longer exists)."""

from __future__ import annotations

import re

from service.settings import ServiceSettings
from tests.conftest import REPO


def test_readme_settings_table_matches_the_settings_model():
    readme = (REPO / "README.md").read_text()
    documented = set(re.findall(r"^\| `ADAPTER_SERVICE_([A-Z0-9_]+)` \|", readme, flags=re.M))
    fields = {name.upper() for name in ServiceSettings.model_fields}
    assert documented == fields, {"undocumented": fields - documented, "stale": documented - fields}


def test_every_setting_has_a_description():
    missing = [n for n, f in ServiceSettings.model_fields.items() if not f.description]
    assert missing == []


def test_make_run_serves_a_working_copy_not_the_tracked_store(tmp_path):
    """`make run` must leave the checkout clean: it serves .run/store, seeded from adapters_store/ once."""
    import shutil
    import subprocess

    shutil.copy(REPO / "Makefile", tmp_path / "Makefile")
    (tmp_path / "adapters_store" / "sst2").mkdir(parents=True)
    (tmp_path / "adapters_store" / "sst2" / "v1.safetensors").write_bytes(b"bundle")
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / ".installed").touch()
    serve = tmp_path / ".venv" / "bin" / "adapter-service"  # records where it would serve from
    serve.write_text('#!/bin/sh\necho "$ADAPTER_SERVICE_STORE_DIR" > served-from\n')
    serve.chmod(0o755)
    got = subprocess.run(["make", "-o", "install", "run"], cwd=tmp_path, capture_output=True, text=True)
    assert got.returncode == 0, got.stderr
    assert (tmp_path / "served-from").read_text().strip() == ".run/store"
    assert (tmp_path / ".run" / "store" / "sst2" / "v1.safetensors").read_bytes() == b"bundle"
