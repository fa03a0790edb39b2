"""A bounded, closed-loop HTTP load generator (aiohttp client: ~20x less CPU per request than httpx, which
matters when client and server share two cores).

C workers share R requests (the AdapterHub peer's seeded sentences of 8-30 words, tasks drawn uniformly);
each worker sends its next request when the previous one returns. It stops by itself: after R requests,
or at the overall deadline (outstanding requests are cancelled and counted as errors). One unmeasured
warm-up request per task first, so lazy adapter loading is not measured as latency.

bench/http_bench.py drives it; alone, it points at any server with the `POST /predict/{task}` `{"text"}` API:

    .venv/bin/python bench/loadgen.py --url http://127.0.0.1:8000 --tasks sst2,ag_news -c 32 -n 640
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script (`python bench/loadgen.py`), the import path starts at bench/, not at the repo
# root: put the root first, for the bench.*, service.* and tests.* imports.
if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import asyncio
import json
import time
from collections import Counter
from dataclasses import dataclass, field

import aiohttp

from bench.common import peer_sentences_module, percentile


@dataclass
class LoadResult:
    concurrency: int
    requests: int
    ok: int
    errors: int
    error_kinds: dict[str, int]
    seconds: float
    latencies_ms: list[float] = field(repr=False)
    versions: Counter = field(default_factory=Counter, repr=False)

    @property
    def rps(self) -> float:
        return self.ok / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> dict:
        lat = self.latencies_ms
        return {
            "concurrency": self.concurrency, "requests": self.requests, "ok": self.ok, "errors": self.errors,
            "error_kinds": dict(self.error_kinds), "seconds": round(self.seconds, 2), "req_per_s": round(self.rps, 1),
            "p50_ms": round(percentile(lat, 50), 1), "p90_ms": round(percentile(lat, 90), 1),
            "p99_ms": round(percentile(lat, 99), 1),
        }


async def run_load(
    url: str, tasks: list[str], *, concurrency: int, requests: int, seed: int = 0, timeout_s: float = 60.0,
    deadline_s: float = 300.0, warmup: bool = True, body_for=None, draws: list[str] | None = None,
) -> LoadResult:
    """Closed-loop load against `POST {url}/predict/{task}` with `{"text": ...}` bodies. `draws`: the task of
    each request, in order (another distribution than uniform over `tasks`; `tasks` is then what is warmed up)."""
    sents = peer_sentences_module()
    texts = sents.make_sentences(requests, seed=seed)
    req_tasks = draws[:requests] if draws is not None else sents.draw_tasks(requests, tasks, seed=seed + 1)
    body_for = body_for or (lambda task, text: {"text": text})
    latencies: list[float] = []
    errors: Counter = Counter()
    versions: Counter = Counter()
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    async with aiohttp.ClientSession(url.rstrip("/"), connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:

        async def one(task: str, text: str) -> None:
            t0 = time.perf_counter()
            try:
                async with session.post(f"/predict/{task}", json=body_for(task, text)) as resp:
                    body = await resp.json(content_type=None)
                    if resp.status != 200:
                        errors[f"http_{resp.status}"] += 1
                        return
                    if "predictions" in body:
                        versions[(task, body.get("version"))] += 1
                    latencies.append((time.perf_counter() - t0) * 1e3)
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
                errors[type(exc).__name__] += 1

        if warmup:
            warm = sents.make_sentences(len(tasks), seed=seed + 2)
            for task, text in zip(tasks, warm):
                await one(task, text)
            latencies.clear()
            errors.clear()
            versions.clear()
        indices = iter(range(requests))

        async def worker() -> None:
            for i in indices:  # shared iterator: each request is sent by exactly one worker
                await one(req_tasks[i], texts[i])

        t0 = time.perf_counter()
        workers = [asyncio.create_task(worker()) for _ in range(concurrency)]
        _, pending = await asyncio.wait(workers, timeout=deadline_s)
        for w in pending:
            w.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        seconds = time.perf_counter() - t0
    done = len(latencies) + sum(errors.values())
    if done < requests:
        errors["not_completed_before_deadline"] += requests - done
    return LoadResult(concurrency, requests, len(latencies), sum(errors.values()), dict(errors), seconds,
                      latencies, versions)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True, help="server base URL")
    ap.add_argument("--tasks", required=True, help="comma-separated task names, drawn uniformly")
    ap.add_argument("-c", "--concurrency", type=int, default=16)
    ap.add_argument("-n", "--requests", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--deadline-s", type=float, default=300.0, help="stop (and count the rest as errors) after this")
    args = ap.parse_args()
    result = asyncio.run(run_load(args.url, args.tasks.split(","), concurrency=args.concurrency,
                                  requests=args.requests, seed=args.seed, deadline_s=args.deadline_s))
    print(json.dumps(result.summary()))


if __name__ == "__main__":
    main()
