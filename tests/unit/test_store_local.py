"""Local store specifics: atomic writes under failure and under a killed writer, reserved version numbers.
(Behaviour shared with the Redis store is covered by the store contract tests.)"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from service.bundles.manifest import BackboneRef
from service.bundles.store import LocalAdapterStore, atomic_write_bytes
from service.errors import InvalidTaskName, TaskNotFound, VersionNotFound
from tests.conftest import REPO, make_bundle, make_manifest

REF = BackboneRef(id="tiny", fingerprint="ab" * 32, model_type="bert", hidden_size=32, num_layers=2)


@functools.cache
def bundle(task: str = "sst2", seed: int = 0) -> bytes:
    """Bundle bytes, one fixed value per (task, seed) (manifests carry a creation time)."""
    return make_bundle(make_manifest(REF, task=task), seed=seed)


def visible_files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and ".tmp-" not in p.name}


def test_versions_activate_roll_back_and_are_never_reused(store):
    assert store.put("sst2", bundle(seed=1)).version == 1
    assert store.put("sst2", bundle(seed=2)).version == 2
    assert store.get_active("sst2") == 2
    store.set_active("sst2", 1)
    assert store.get_active("sst2") == 1
    assert store.get_bytes("sst2", 2) == bundle(seed=2)
    store.delete_task("sst2")
    assert store.list_tasks() == []
    with pytest.raises(TaskNotFound):
        store.get_active("sst2")
    assert store.put("sst2", bundle(seed=3)).version == 3  # 1 and 2 stay reserved


def test_unknown_version_and_task(store):
    store.put("sst2", bundle())
    with pytest.raises(VersionNotFound):
        store.get_bytes("sst2", 7)
    with pytest.raises(TaskNotFound):
        store.get_bytes("nope", 1)
    with pytest.raises(VersionNotFound):
        store.set_active("sst2", 7)


@pytest.mark.parametrize("name", ["../escape", "a/b", "..", "", "UPPER"])
def test_task_names_cannot_escape_the_store(store, name):
    with pytest.raises(InvalidTaskName):
        store.get_bytes(name, 1)


def test_a_failed_write_leaves_nothing_visible(store, monkeypatch):
    store.put("sst2", bundle(seed=1))
    before = visible_files(store.root)
    gen = store.generation()

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        store.put("sst2", bundle(seed=2))
    monkeypatch.undo()
    assert visible_files(store.root) == before  # no half file, no moved pointer
    assert not list(store.root.rglob("*.tmp-*"))  # and the temp file was cleaned up
    assert store.get_active("sst2") == 1
    assert store.generation() == gen
    assert store.put("sst2", bundle(seed=3)).version == 2


def test_atomic_write_replaces_whole_file(tmp_path):
    target = tmp_path / "f"
    atomic_write_bytes(target, b"old")
    atomic_write_bytes(target, b"new" * 1000)
    assert target.read_bytes() == b"new" * 1000


WRITER = textwrap.dedent(
    """
    import os, sys, time
    sys.path.insert(0, {repo!r})
    import service.bundles.store as st
    real_fdopen = os.fdopen

    class Slow:
        # Writes the first half, signals the parent, then hangs: the parent kills us mid-write.
        def __init__(self, fh): self.fh = fh
        def write(self, data):
            half = len(data) // 2
            self.fh.write(data[:half]); self.fh.flush()
            print("HALF", flush=True)
            time.sleep(60)
        def __getattr__(self, name): return getattr(self.fh, name)
        def __enter__(self): return self
        def __exit__(self, *a): return self.fh.__exit__(*a)

    def slow_fdopen(fd, mode="r", *a, **k):
        fh = real_fdopen(fd, mode, *a, **k)
        return Slow(fh) if "w" in mode and os.fstat(fd).st_size == 0 and big[0] else fh

    big = [False]
    st.os.fdopen = slow_fdopen
    store = st.LocalAdapterStore(sys.argv[1])
    data = open(sys.argv[2], "rb").read()
    orig = st.atomic_write_bytes
    def aw(path, payload):
        big[0] = path.suffix == ".safetensors"
        return orig(path, payload)
    st.atomic_write_bytes = aw
    store.put("sst2", data)
    """
)


def test_a_writer_killed_mid_write_never_leaves_a_half_file_visible(tmp_path):
    root = tmp_path / "store"
    store = LocalAdapterStore(root)
    store.put("sst2", bundle(seed=1))
    payload = tmp_path / "payload.safetensors"
    payload.write_bytes(bundle(seed=2))
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(repo=str(REPO)))
    proc = subprocess.Popen([sys.executable, str(script), str(root), str(payload)], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "HALF", "writer did not reach the middle of its write"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    # The half-written temp file exists but is invisible: versions, pointers and reads are untouched.
    assert list(root.rglob(".v2.safetensors.tmp-*")), "expected the killed writer's temp file"
    fresh = LocalAdapterStore(root)
    assert fresh.list_versions("sst2") == [1]
    assert fresh.get_active("sst2") == 1
    assert fresh.get_bytes("sst2", 1) == bundle(seed=1)
    # Version 2 was allocated before the crash and stays reserved; the next upload gets 3.
    assert fresh.put("sst2", bundle(seed=3)).version == 3
    assert fresh.get_active("sst2") == 3


def test_stale_temp_files_are_removed_at_start(tmp_path):
    root = tmp_path / "store"
    (root / "sst2").mkdir(parents=True)
    stale = root / "sst2" / ".v1.safetensors.tmp-dead"
    stale.write_bytes(b"half")
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    fresh = root / "sst2" / ".v2.safetensors.tmp-live"  # maybe another process writing right now
    fresh.write_bytes(b"half")
    LocalAdapterStore(root)
    assert not stale.exists()
    assert fresh.exists()
