"""Soak with a small device cache: do requests and uploads still all succeed, and at what throughput?

    .venv/bin/python bench/soak.py [--requests 10000] [--uploads 100] [--slots 8,64] [--rounds 1]

For each slot count (`ADAPTER_SERVICE_CACHE_MAX_SLOTS`), in turn and in the same run, it starts an
`adapter-service serve` (the server's defaults otherwise: on a 2-core CPU 2 forward workers x 1 thread) on a
fresh copy of one local store with 16 tasks (random Houlsby adapters, m = 64, 2-class heads, like the
peer's), sends one warm-up predict per task, then a closed loop of `--requests` predicts at `--concurrency`
(the peer's seeded sentences, tasks drawn uniformly) while it uploads `--uploads` new versions of those
tasks (`--gap-s` apart, one after the other; each upload is smoke-tested, stored, activated and pre-loaded
by the server). Failed = any predict or upload that did not answer 200 / 201.

Server memory: RSS after the warm-up, after each quarter of the uploads, every `--rss-every-s` seconds, and
at the end (from /proc); with `--uploads 0` the same traffic shows what traffic alone adds.
Prints one line per server and a JSON report with throughput ratios (smallest cache over largest); the
exit status is 1 when anything failed.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script (`python bench/soak.py`), the import path starts at bench/, not at the repo
# root: put the root first, for the bench.*, service.* and tests.* imports.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import asyncio
import contextlib
import json
import random
import shutil
import tempfile
import time
from collections import Counter

import aiohttp

from bench.common import REPO, machine, random_task_store
from bench.http_bench import start, stop, wait_http
from bench.loadgen import run_load

TOKEN = "soak-bench"


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def new_versions(names: list[str], ref, count: int) -> list[tuple[str, bytes]]:
    """`count` bundles of new versions: random weights, tasks drawn from `names` with a fixed seed."""
    from service.bundles.codec import encode_bundle
    from service.bundles.manifest import AdapterConfig, HeadType, Manifest
    from tests.synthetic import random_tensors

    rng = random.Random(7)
    out = []
    for i in range(count):
        task = rng.choice(names)
        manifest = Manifest(task=task, head_type=HeadType.CLASSIFICATION, labels=["negative", "positive"],
                            adapter=AdapterConfig(bottleneck=64), backbone=ref)
        out.append((task, encode_bundle(manifest, random_tensors(manifest, seed=1000 + i))))
    return out


async def upload_all(url: str, bundles: list[tuple[str, bytes]], gap_s: float, pid: int, rss: dict,
                     load_done: asyncio.Event) -> Counter:
    outcomes: Counter = Counter()
    quarter = max(1, len(bundles) // 4)
    async with aiohttp.ClientSession(url, headers={"Authorization": f"Bearer {TOKEN}"},
                                     timeout=aiohttp.ClientTimeout(total=120)) as session:
        for i, (task, data) in enumerate(bundles, 1):
            if load_done.is_set():
                outcomes["not_sent_traffic_over"] += 1
                continue
            form = aiohttp.FormData()
            form.add_field("file", data, filename=f"{task}.safetensors")
            try:
                async with session.post("/adapters", data=form) as resp:
                    outcomes["ok" if resp.status == 201 else f"http_{resp.status}"] += 1
                    await resp.read()
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                outcomes[type(exc).__name__] += 1
            if i % quarter == 0:
                rss[f"after_{i}_uploads"] = round(rss_mib(pid), 1)
            await asyncio.sleep(gap_s)
    return outcomes


async def soak(url: str, names: list[str], bundles, args, pid: int) -> dict:
    rss: dict[str, float] = {}
    async with aiohttp.ClientSession(url) as session:  # warm-up: every task once
        for task in names:
            async with session.post(f"/predict/{task}", json={"text": "warm up"}) as resp:
                await resp.read()
    rss["after_warmup"] = round(rss_mib(pid), 1)
    load_done = asyncio.Event()

    async def load():
        try:
            return await run_load(url, names, concurrency=args.concurrency, requests=args.requests, seed=0,
                                  warmup=False, deadline_s=args.deadline_s)
        finally:
            load_done.set()

    timeline: list[tuple[float, float]] = []

    async def sample_rss():
        t0 = time.perf_counter()
        while not load_done.is_set():
            timeline.append((round(time.perf_counter() - t0, 1), round(rss_mib(pid), 1)))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(load_done.wait(), args.rss_every_s)

    result, uploads, _ = await asyncio.gather(load(), upload_all(url, bundles, args.gap_s, pid, rss, load_done),
                                              sample_rss())
    rss["at_end"] = round(rss_mib(pid), 1)
    async with aiohttp.ClientSession(url) as session, session.get("/metrics") as resp:
        metrics = await resp.text()
    wanted = ("adapter_service_batches_cut_short_total", "adapter_service_cache_slot_waits_total",
              "adapter_service_cache_slot_wait_timeouts_total", "adapter_service_cache_evictions_total",
              "adapter_service_admission_wait_seconds_count", "adapter_service_admission_wait_seconds_sum")
    counters = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
                if line.split() and line.split()[0] in wanted}
    return {"load": result.summary(), "uploads": dict(uploads), "rss_mib": rss, "rss_timeline_s_mib": timeline,
            "metrics": counters}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--tasks", type=int, default=16)
    ap.add_argument("--uploads", type=int, default=100)
    ap.add_argument("--gap-s", type=float, default=0.3, help="pause after each upload")
    ap.add_argument("--slots", default="8,64", help="comma-separated ADAPTER_SERVICE_CACHE_MAX_SLOTS values")
    ap.add_argument("--rounds", type=int, default=1, help="servers per slot count, alternating")
    ap.add_argument("--rss-every-s", type=float, default=10.0, help="RSS sampling period during the traffic")
    ap.add_argument("--deadline-s", type=float, default=900.0)
    ap.add_argument("--port", type=int, default=8771)
    ap.add_argument("--out", type=Path, help="also write the JSON report here")
    args = ap.parse_args()

    from service.modeling.backbone import load_backbone

    work = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    ref = load_backbone(device="cpu").ref
    names = random_task_store(work / "seed-store", ref, args.tasks)
    bundles = new_versions(names, ref, args.uploads)
    url = f"http://127.0.0.1:{args.port}"
    runs: dict[str, list[dict]] = {s: [] for s in args.slots.split(",")}
    failed = False
    try:
        for rnd in range(args.rounds):
            for slots in runs:
                store = work / f"store-{slots}-{rnd}"
                shutil.copytree(work / "seed-store", store)
                env = {"ADAPTER_SERVICE_STORE_DIR": str(store), "ADAPTER_SERVICE_PORT": str(args.port),
                       "ADAPTER_SERVICE_ADMIN_TOKEN": TOKEN, "ADAPTER_SERVICE_LOG_LEVEL": "warning",
                       "ADAPTER_SERVICE_CACHE_MAX_SLOTS": slots}
                log = work / f"server-{slots}-{rnd}.log"
                proc = start([str(REPO / ".venv" / "bin" / "adapter-service"), "serve"], env, log)
                try:
                    wait_http(f"{url}/readyz", proc, log)
                    t0 = time.perf_counter()
                    got = asyncio.run(soak(url, names, bundles, args, proc.pid))
                    got["wall_s"] = round(time.perf_counter() - t0, 1)
                finally:
                    stop(proc)
                runs[slots].append(got)
                load, up = got["load"], got["uploads"]
                failed |= load["errors"] > 0 or any(k != "ok" for k in up)
                print(f"slots {slots:>4} round {rnd + 1}: {load['req_per_s']:.1f} req/s, p99 {load['p99_ms']:.0f} ms, "
                      f"failed requests {load['errors']} {load['error_kinds']}, uploads {up}, RSS MiB {got['rss_mib']}, "
                      f"{got['metrics']}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    slot_counts = sorted(runs, key=int)
    small, large = slot_counts[0], slot_counts[-1]
    ratios = [s["load"]["req_per_s"] / b["load"]["req_per_s"] for s, b in zip(runs[small], runs[large])]
    report = {"machine": machine(), "command": "python " + " ".join(sys.argv), "runs": runs,
              f"throughput_{small}_over_{large}_slots": [round(r, 3) for r in ratios]}
    print(f"throughput with {small} slots / with {large}: {', '.join(f'{r:.3f}' for r in ratios)}")
    print(json.dumps(report))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
