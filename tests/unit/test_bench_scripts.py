"""Every benchmark script starts (its `--help`) when run the documented way, `python bench/NAME.py`, with
bench/ first on the import path: no file there may shadow a standard-library module."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO

SCRIPTS = sorted(p.name for p in (REPO / "bench").glob("*.py") if p.name not in {"__init__.py", "common.py"})


def test_the_scripts_are_found():
    assert {"engine.py", "http_bench.py", "hotswap.py", "loadgen.py"} <= set(SCRIPTS)


def test_no_bench_module_shadows_the_standard_library():
    names = {p.stem for p in (REPO / "bench").glob("*.py")}
    assert names & set(sys.stdlib_module_names) == set()


@pytest.mark.parametrize("script", SCRIPTS)
def test_bench_script_starts(script):
    proc = subprocess.run([sys.executable, f"bench/{script}", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage" in proc.stdout.lower(), proc.stdout[-500:]
