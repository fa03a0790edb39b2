"""What a device-cache miss costs the forward worker when the bundle is already decoded in host memory: the
slot write and the head build, timed per acquire, optionally side by side with another commit.

    .venv/bin/python bench/cold_load.py [--tasks 1000] [--rounds 4] [--bottleneck 8] [--against GIT_REF]

Packaged MiniLM (in `--dtype`, default bfloat16), `--tasks` classification tasks shaped as in
`bench/scale.py` (Pfeiffer placement, bottleneck `--bottleneck`, no hidden head layer), all decoded into the
host cache first; then each task acquired and released in turn through a device cache of 64 slots, twice:
the second pass, where every acquire evicts, is timed (1 thread). With more tasks than the cache keeps spare
heads for (4 per slot), every timed acquire builds its head as well. Each round runs in a fresh process, one per side; with
`--against REF` the sides alternate round by round, the other side importing `service` from a git worktree
of REF. Prints each side's p50 / p99 per round and the median over rounds of the per-round p50 ratio
(REF / this checkout), and one JSON line.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script (`python bench/cold_load.py`), the import path starts at bench/, not at the repo
# root: put the root first, for the bench.*, service.* and tests.* imports.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import os
import subprocess
import tempfile
import time

from bench.common import REPO, machine, median, percentile


def measure(tasks: int, bottleneck: int, dtype: str) -> list[float]:
    """Milliseconds of each acquire + release (in this process's `service`, first on sys.path)."""
    import torch

    from bench.scale import make_bundles
    from service.bundles.store import LocalAdapterStore
    from service.host_memory import keep_freed_memory
    from service.modeling.backbone import load_backbone
    from service.runtime.engine import Engine

    torch.set_num_threads(1)
    keep_freed_memory()
    backbone = load_backbone(device="cpu", dtype=dtype)
    store = LocalAdapterStore(Path(tempfile.mkdtemp(prefix="bench-cold-")))
    names = [f"t{i}" for i in range(tasks)]
    for name, data in make_bundles(backbone.ref, names, bottleneck):
        store.put(name, data)
    engine = Engine(backbone, store, cache_max_slots=64, host_cache_bytes=1 << 30)
    for name in names:
        engine.host_cache.get(name, 1)
    times = []
    for measured in (False, True):  # an unmeasured pass first: every code path warm, the cache full
        for name in names:
            t0 = time.perf_counter()
            engine.cache.release(engine.cache.acquire(name, 1))
            if measured:
                times.append((time.perf_counter() - t0) * 1e3)
    return times


def run_side(root: Path, args: argparse.Namespace) -> list[float]:
    """One round in a fresh process importing `service` from `root`."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--measure", "--tasks", str(args.tasks),
           "--bottleneck", str(args.bottleneck), "--dtype", args.dtype]
    env = {**os.environ, "BENCH_SERVICE_ROOT": str(root)}
    out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, check=True).stdout
    times: list[float] = json.loads(out.strip().splitlines()[-1])
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--bottleneck", type=int, default=8)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--against", help="also measure this git ref (a worktree of it), alternating rounds")
    ap.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)  # one round (a child process)
    args = ap.parse_args()
    if args.measure:
        sys.path.insert(0, os.environ.get("BENCH_SERVICE_ROOT", str(REPO)))
        print(json.dumps(measure(args.tasks, args.bottleneck, args.dtype)))
        return
    sides = {"this checkout": REPO}
    work = Path(tempfile.mkdtemp(prefix="bench-cold-load-"))
    if args.against:
        tree = work / "against"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(tree), args.against],
                       check=True)
        sides[args.against] = tree
    results: dict[str, list[dict[str, float]]] = {side: [] for side in sides}
    try:
        for r in range(args.rounds):
            for side in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
                times = run_side(sides[side], args)
                results[side].append({"p50_ms": round(median(times), 3), "p99_ms": round(percentile(times, 99), 3)})
                print(f"round {r + 1} {side:>14}: p50 {results[side][-1]['p50_ms']:.3f} ms, "
                      f"p99 {results[side][-1]['p99_ms']:.3f} ms", flush=True)
    finally:
        if args.against:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(sides[args.against])])
    report: dict = {"machine": machine(), "command": "python bench/cold_load.py " + " ".join(sys.argv[1:]),
                    "args": {k: v for k, v in vars(args).items() if k != "measure"}, "rounds": results}
    if args.against:
        ratio = median([a["p50_ms"] / b["p50_ms"] for a, b in zip(results[args.against], results["this checkout"])])
        report["p50_ratio_against_over_this"] = round(ratio, 3)
        print(f"median p50 ratio {args.against} / this checkout: {ratio:.3f}")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
