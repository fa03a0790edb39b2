"""HTTP benchmark: our service vs the AdapterHub peer on the same traffic, with the in-process engine as the
ceiling, all measured in one run.

    .venv/bin/python bench/http_bench.py [--concurrency 1,8,32] [--rounds 2] [--no-peer]

16 tasks (random Houlsby adapters, bottleneck 64, 2-class heads) on the packaged all-MiniLM-L6-v2, uniformly
mixed, seeded sentences of 8-30 words (the peer's generator), one request = one sentence. Each round runs,
one after the other on the same machine: the in-process engine (mixed batches of 32), our server at each
concurrency, the peer server at each concurrency. Servers never run at the same time. Ratios are taken
within a round, then the median over rounds is reported. Each load level also reports the cores the server
and the client kept busy (CPU seconds per wall second), since both share the machine.

The peer is ../shared/peers/adapterhub/server.py in its own venv (built by its setup.sh if missing) with
16 tasks from its make_tasks.py, in its default configuration (`set_active_adapters` + forward under a
lock, 2 torch threads): the server a user of the `adapters` library would write.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script (`python bench/http_bench.py`), the import path starts at bench/, not at the repo
# root: put the root first, for the bench.*, service.* and tests.* imports.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import asyncio
import json
import os
import subprocess
import tempfile
import time

import httpx

from bench.common import PEER_DIR, REPO, machine, median, peer_sentences_module, random_task_store
from bench.loadgen import run_load


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, env={**os.environ, **env}, stdout=log.open("ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"server exited ({proc.returncode}); log:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    sys.exit(f"server not ready after {timeout}s; log:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def inproc_mixed_seq_per_s(store_root: Path, names: list[str], n: int = 256, batch: int = 32, passes: int = 3) -> float:
    """The ceiling: the engine alone, mixed batches of 32 over the same kind of sentences (median of passes)."""
    from service.bundles.store import LocalAdapterStore
    from service.host_memory import keep_freed_memory
    from service.modeling.backbone import load_backbone
    from service.runtime.engine import Engine, RowRequest

    keep_freed_memory()  # set up as the server sets itself up
    engine = Engine(load_backbone(device="cpu"), LocalAdapterStore(store_root))
    sents = peer_sentences_module()
    texts, tasks = sents.make_sentences(n, seed=5), sents.draw_tasks(n, names, seed=6)
    rows = engine.encode(engine.store.get_info(names[0], 1).manifest, texts)
    reqs = [RowRequest(t, 1, r) for t, r in zip(tasks, rows)]
    engine.run(reqs[:batch])
    for name in names:
        engine.warm(name, 1)
    times = []
    for _ in range(passes):
        t0 = time.perf_counter()
        for i in range(0, n, batch):
            engine.run(reqs[i : i + batch])
        times.append(time.perf_counter() - t0)
    return n / median(times)


def ensure_peer(venv: Path, tasks_dir: Path, num_tasks: int) -> Path:
    python = venv / "bin" / "python"
    if not python.exists():
        print(f">> building the peer venv at {venv} (its setup.sh, ~2 min)", flush=True)
        subprocess.run(["bash", str(PEER_DIR / "setup.sh")], env={**os.environ, "VENV": str(venv)}, check=True)
    if not (tasks_dir / f"task{num_tasks - 1:02d}").exists():
        subprocess.run([str(python), str(PEER_DIR / "make_tasks.py"), "--out-dir", str(tasks_dir),
                        "--num-tasks", str(num_tasks)], check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return python


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(url: str, names: list[str], levels: list[int], per_worker: int, seed: int, server_pid: int) -> dict[int, dict]:
    """Load at each concurrency; also the cores the server and this client (the load generator) kept busy,
    since both share the machine: the server can use at most what the client leaves."""
    out = {}
    for c in levels:
        wall0, client0, server0 = time.perf_counter(), time.process_time(), cpu_seconds(server_pid)
        result = asyncio.run(run_load(url, names, concurrency=c, requests=max(40, c * per_worker), seed=seed))
        wall = time.perf_counter() - wall0
        out[c] = result.summary() | {
            "server_cores_busy": round((cpu_seconds(server_pid) - server0) / wall, 2),
            "client_cores_busy": round((time.process_time() - client0) / wall, 2),
        }
        print(f"   c={c:<3} {out[c]['req_per_s']:>7.1f} req/s  p50 {out[c]['p50_ms']:>7.1f}  p90 {out[c]['p90_ms']:>7.1f}"
              f"  p99 {out[c]['p99_ms']:>7.1f} ms  errors {out[c]['errors']}  cores busy: server "
              f"{out[c]['server_cores_busy']:.2f} client {out[c]['client_cores_busy']:.2f}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tasks", type=int, default=16)
    ap.add_argument("--per-worker", type=int, default=20, help="requests per worker at each concurrency")
    ap.add_argument("--peer-per-worker", type=int, default=8, help="the peer is slow: fewer requests per worker")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--peer-venv", type=Path, default=Path("/tmp/peervenv"))
    ap.add_argument("--peer-tasks", type=Path, default=Path("/tmp/ah_tasks"))
    ap.add_argument("--port", type=int, default=8760)
    ap.add_argument("--out", type=Path, help="also write the JSON report here")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    work = Path(tempfile.mkdtemp(prefix="bench-http-"))

    from service.modeling.backbone import load_backbone

    store_root = work / "store"
    names = random_task_store(store_root, load_backbone(device="cpu").ref, args.tasks)
    peer_python = None if args.no_peer else ensure_peer(args.peer_venv, args.peer_tasks, args.tasks)
    ours_cmd = [str(REPO / ".venv" / "bin" / "adapter-service"), "serve"]
    ours_env = {"ADAPTER_SERVICE_STORE_DIR": str(store_root), "ADAPTER_SERVICE_PORT": str(args.port),
                "ADAPTER_SERVICE_ADMIN_TOKEN": "bench", "ADAPTER_SERVICE_LOG_LEVEL": "warning"}
    rounds = []
    for r in range(args.rounds):
        print(f"== round {r + 1}/{args.rounds}", flush=True)
        inproc = inproc_mixed_seq_per_s(store_root, names)
        print(f"   in-process mixed-16 engine: {inproc:.1f} seq/s", flush=True)
        print("-- ours", flush=True)
        proc = start(ours_cmd, ours_env, work / "ours.log")
        try:
            wait_http(f"http://127.0.0.1:{args.port}/readyz", proc, work / "ours.log")
            ready = httpx.get(f"http://127.0.0.1:{args.port}/readyz", timeout=5).json()
            compute = {k: ready.get(k) for k in ("device", "precision", "precision_reason", "forward")}
            print(f"   compute: {compute}", flush=True)
            ours = measure(f"http://127.0.0.1:{args.port}", names, levels, args.per_worker, seed=r, server_pid=proc.pid)
        finally:
            stop(proc)
        peer = None
        if peer_python is not None:
            print("-- peer (AdapterHub adapters, set_active_adapters under a lock)", flush=True)
            port = args.port + 1
            proc = start([str(peer_python), str(PEER_DIR / "server.py"), "--tasks-dir", str(args.peer_tasks),
                          "--port", str(port)], {"HF_HUB_OFFLINE": "1"}, work / "peer.log")
            try:
                wait_http(f"http://127.0.0.1:{port}/health", proc, work / "peer.log")
                peer = measure(f"http://127.0.0.1:{port}", names, levels, args.peer_per_worker, seed=r,
                               server_pid=proc.pid)
            finally:
                stop(proc)
        rounds.append({"inproc_seq_per_s": round(inproc, 1), "compute": compute, "ours": ours, "peer": peer})

    top = max(levels)
    report = {
        "machine": machine(),
        "command": "python " + " ".join(sys.argv),
        "tasks": args.tasks, "levels": levels, "rounds": rounds,
        "median_ratio_ours_over_inproc_at_max_c": round(median(
            [x["ours"][top]["req_per_s"] / x["inproc_seq_per_s"] for x in rounds]), 3),
    }
    if peer_python is not None:
        report["median_ratio_ours_over_peer_at_max_c"] = round(median(
            [x["ours"][top]["req_per_s"] / x["peer"][top]["req_per_s"] for x in rounds]), 2)
        report["median_p99_ms_at_max_c"] = {
            "ours": median([x["ours"][top]["p99_ms"] for x in rounds]),
            "peer": median([x["peer"][top]["p99_ms"] for x in rounds]),
        }
    print(json.dumps(report))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
