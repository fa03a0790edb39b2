"""Real helper processes for the cluster tests (and the hot-swap bench): a private `redis-server`, a
private nginx and `adapter-service serve` replicas, each on a free loopback port in its own folder,
stoppable and restartable.

Neither ever touches a shared instance (the Redis on 6379, the system nginx): ports are picked free, data
and logs live in the given folder. `close()` kills whatever is left; fixtures call it in their finalizers.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import redis

from tests.cluster.nginx import render_site, standalone_config, upstream_servers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_binary(name: str, apt_package: str) -> str:
    """Path of `name`; in CI (CI set) a missing binary FAILS the test, locally it skips it."""
    path = shutil.which(name) or next((p for d in ("/usr/sbin", "/usr/local/sbin", "/sbin")
                                        if os.access(p := f"{d}/{name}", os.X_OK)), None)
    if path:
        return path
    msg = f"`{name}` is not installed: `apt-get install -y {apt_package}` (make test installs it when run as root)"
    if os.environ.get("CI"):
        pytest.fail(msg)
    pytest.skip(msg)


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}: {log.read_text(errors='replace')[-2000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.02)
    raise RuntimeError(f"nothing listens on port {port} after {timeout}s: {log.read_text(errors='replace')[-2000:]}")


def _terminate(proc: subprocess.Popen | None, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


class RedisServer:
    """A private redis-server: AOF on, fsync on every write (as deploy/ configures), no RDB snapshots."""

    def __init__(self, workdir: Path, *, appendfsync: str = "always"):
        self.binary = require_binary("redis-server", "redis-server")
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.appendfsync = appendfsync
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log(self) -> Path:
        return self.dir / "redis.log"

    def start(self) -> RedisServer:
        if self.proc is not None and self.proc.poll() is None:
            return self
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--appendonly", "yes", "--appendfsync", self.appendfsync, "--save", "",
             "--maxmemory-policy", "noeviction", "--logfile", str(self.log), "--daemonize", "no"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, self.proc, 10.0, self.log)
        self._wait_loaded()
        return self

    def _wait_loaded(self, timeout: float = 10.0) -> None:
        """Listening is not serving: after a restart Redis answers LOADING until the AOF is replayed."""
        client = redis.Redis(port=self.port, socket_timeout=1)
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    client.ping()
                    return
                except redis.BusyLoadingError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.02)
        finally:
            client.close()

    def stop(self, *, crash: bool = False) -> None:
        """SIGTERM (clean shutdown) or, with `crash`, SIGKILL: what was acknowledged must survive either."""
        _terminate(self.proc, signal.SIGKILL if crash else signal.SIGTERM)
        self.proc = None

    def restart(self, *, crash: bool = False) -> RedisServer:
        self.stop(crash=crash)
        return self.start()

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=2)

    def close(self) -> None:
        _terminate(self.proc, signal.SIGKILL)
        self.proc = None


class NginxServer:
    """A private nginx running the deploy/ load-balancer template in front of `upstreams` (host:port)."""

    def __init__(self, workdir: Path, upstreams: Sequence[str], *, max_body: str = "64m", **server_params):
        self.binary = require_binary("nginx", "nginx")
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        site = self.dir / "site.conf"
        site.write_text(render_site(listen=str(self.port), upstreams=upstream_servers(upstreams, **server_params),
                                    max_body=max_body))
        self.config = self.dir / "nginx.conf"
        self.config.write_text(standalone_config(site, self.dir))
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def error_log(self) -> Path:
        return self.dir / "error.log"

    def command(self, *extra: str) -> list[str]:
        return [self.binary, "-p", str(self.dir), "-e", str(self.error_log), "-c", str(self.config), *extra]

    def check(self) -> subprocess.CompletedProcess:
        """`nginx -t` on the rendered configuration."""
        return subprocess.run(self.command("-t"), capture_output=True, text=True, timeout=30)

    def start(self) -> NginxServer:
        self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_for_port(self.port, self.proc, 10.0, self.error_log)
        return self

    def close(self) -> None:
        _terminate(self.proc, signal.SIGTERM)  # fast shutdown (SIGQUIT would wait for idle keepalives)
        self.proc = None


class ServiceReplica:
    """One `adapter-service serve` process (the real CLI entry point) on a free loopback port.

    `env` adds ADAPTER_SERVICE_* settings (e.g. ADAPTER_SERVICE_REDIS_URL); the replica id defaults to
    `name`. `start()` returns once /readyz answers 200; `kill()` is SIGKILL (a crash), `stop()` SIGTERM.
    """

    def __init__(self, workdir: Path, name: str, *, backbone: str, env: dict[str, str] | None = None):
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.port = free_port()
        self.env = {
            **os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "ADAPTER_SERVICE_HOST": "127.0.0.1", "ADAPTER_SERVICE_PORT": str(self.port),
            "ADAPTER_SERVICE_BACKBONE": backbone, "ADAPTER_SERVICE_DEVICE": "cpu",
            "ADAPTER_SERVICE_TORCH_THREADS": "1", "ADAPTER_SERVICE_REPLICA_ID": name,
            "ADAPTER_SERVICE_STORE_DIR": str(self.dir / "store"), **(env or {}),
        }
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.dir / f"{self.name}.log"

    def start(self, timeout: float = 120.0) -> ServiceReplica:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve"], env=self.env,
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        wait_for_port(self.port, self.proc, timeout, self.log)
        deadline = time.monotonic() + timeout
        while True:  # listening comes before readiness only if the app ever changes that: check anyway
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"GET /readyz HTTP/1.0\r\nHost: x\r\n\r\n")
                if s.recv(64).startswith(b"HTTP/1.1 200"):
                    return self
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"replica {self.name} not ready: {self.log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        _terminate(self.proc, signal.SIGTERM, timeout=20)
        self.proc = None

    def kill(self) -> None:
        _terminate(self.proc, signal.SIGKILL)
        self.proc = None

    close = kill
