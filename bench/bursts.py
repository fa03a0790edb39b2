"""Bursts on an idle server: how long until the last answer, when many rows arrive at once?

    .venv/bin/python bench/bursts.py [--against GIT_REF] [--repeats 2] [--bursts 15]

Two shapes, 16 tasks (random Houlsby adapters, m = 64) on the packaged MiniLM, the peer's seeded
sentences, the server's defaults (on a 2-core CPU: 2 forward workers x 1 thread):
- one request carrying 32 texts (`{"texts": [...]}`), then a pause, repeated `--bursts` times;
- 32 concurrent one-text requests, then a pause, repeated `--bursts` times.
Each shape reports the p50 / min / max of the time until the last answer. With `--against REF`, the same
runs are made, alternating, against a server running the code of REF (a git worktree of it, put first on
the import path), so the two are measured side by side in one run.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script (`python bench/bursts.py`), the import path starts at bench/, not at the repo
# root: put the root first, for the bench.*, service.* and tests.* imports.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import asyncio
import json
import subprocess
import tempfile
import time

import aiohttp

from bench.common import REPO, machine, median, peer_sentences_module, random_task_store
from bench.http_bench import start, stop, wait_http

BURST = 32


async def bursts(url: str, names: list[str], count: int, pause_s: float) -> dict[str, list[float]]:
    sents = peer_sentences_module()
    texts = sents.make_sentences(BURST * (count + 1), seed=3)
    tasks = sents.draw_tasks(BURST * (count + 1), names, seed=4)
    out: dict[str, list[float]] = {"one_request_32_texts_ms": [], "burst_32_requests_ms": []}
    async with aiohttp.ClientSession() as session:
        async def post(task: str, body: dict) -> None:
            async with session.post(f"{url}/predict/{task}", json=body) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"{resp.status}: {await resp.text()}")
                await resp.read()

        # Unmeasured: load every task and open the connections.
        await asyncio.gather(*(post(tasks[i], {"text": texts[i]}) for i in range(BURST)))
        for b in range(1, count + 1):
            rows = range(b * BURST, (b + 1) * BURST)
            await asyncio.sleep(pause_s)
            t0 = time.perf_counter()
            await post(tasks[rows[0]], {"texts": [texts[i] for i in rows]})
            out["one_request_32_texts_ms"].append((time.perf_counter() - t0) * 1e3)
            await asyncio.sleep(pause_s)
            t0 = time.perf_counter()
            await asyncio.gather(*(post(tasks[i], {"text": texts[i]}) for i in rows))
            out["burst_32_requests_ms"].append((time.perf_counter() - t0) * 1e3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--against", help="also measure the server at this git ref (a worktree of it)")
    ap.add_argument("--repeats", type=int, default=2, help="server starts per side, alternating")
    ap.add_argument("--bursts", type=int, default=15, help="bursts of each shape per server start")
    ap.add_argument("--pause-s", type=float, default=0.4, help="idle time before each burst")
    ap.add_argument("--port", type=int, default=8770)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-bursts-"))

    from service.modeling.backbone import load_backbone

    store_root = work / "store"
    names = random_task_store(store_root, load_backbone(device="cpu").ref, 16)
    sides = {"this tree": None}
    if args.against:
        tree = work / "against"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(tree), args.against], check=True)
        sides[args.against] = tree
    env = {"ADAPTER_SERVICE_STORE_DIR": str(store_root), "ADAPTER_SERVICE_PORT": str(args.port),
           "ADAPTER_SERVICE_ADMIN_TOKEN": "bench", "ADAPTER_SERVICE_LOG_LEVEL": "warning"}
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    try:
        for rep in range(args.repeats):
            for side, tree in sides.items():
                side_env = env | ({"PYTHONPATH": str(tree)} if tree else {})
                proc = start([str(REPO / ".venv" / "bin" / "adapter-service"), "serve"], side_env, work / "server.log")
                try:
                    wait_http(f"http://127.0.0.1:{args.port}/readyz", proc, work / "server.log")
                    got = asyncio.run(bursts(f"http://127.0.0.1:{args.port}", names, args.bursts, args.pause_s))
                finally:
                    stop(proc)
                summary = {k: {"p50": round(median(v), 1), "min": round(min(v), 1), "max": round(max(v), 1)}
                           for k, v in got.items()}
                runs[side].append(summary)
                print(f"{side:<12} start {rep + 1}: " + "  ".join(
                    f"{k} p50 {s['p50']:.0f} (min {s['min']:.0f}, max {s['max']:.0f})" for k, s in summary.items()),
                    flush=True)
    finally:
        if args.against:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(sides[args.against])])
    print(json.dumps({"machine": machine(), "command": "python " + " ".join(sys.argv), "runs": runs}))


if __name__ == "__main__":
    main()
