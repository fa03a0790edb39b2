"""In-process engine benchmark: how much does serving 16 tasks in one mixed batch cost over the backbone?

    .venv/bin/python bench/engine.py [--tasks 16] [--batch 32] [--sentences 256] [--passes 7] [--threads N]

Packaged all-MiniLM-L6-v2, 16 Houlsby tasks (bottleneck 64, classification heads, random weights),
batches of 32 seeded sentences of 8-30 words (the AdapterHub peer's generator). Tokenisation is done up
front and not timed, as in the peer's bench. Modes run interleaved per batch in a rotating order; seq/s is
the median over passes, each ratio the median of the per-pass ratios (same pass, same batches). Prints a table and one JSON line; ratios are taken within this run.
The process is set up as the service sets itself up (the host allocator keeps freed buffers, see
service/host_memory.py; `--no-keep-freed-memory` measures without); `--threads` sets torch's intra-op threads
per forward, by default as many as the service gives each of its forward workers (on a 2-core CPU: 2 workers
x 1 thread).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

# Run as a script, bench/ would head the import path, and bench/http.py would shadow the standard library's
# `http` (which torch imports): put the repo root in its place.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import machine, median, peer_sentences_module, percentile, random_task_store  # noqa: E402
from service.api.app import forward_parallelism  # noqa: E402
from service.bundles.store import LocalAdapterStore  # noqa: E402
from service.host_memory import keep_freed_memory  # noqa: E402
from service.modeling.backbone import load_backbone, pick_device  # noqa: E402
from service.runtime.engine import Engine, RowRequest, default_strategy  # noqa: E402
from service.settings import ServiceSettings  # noqa: E402


def build(args):
    backbone = load_backbone(device=args.device)
    root = Path(tempfile.mkdtemp(prefix="bench-store-"))
    names = random_task_store(root, backbone.ref, args.tasks, args.bottleneck, args.placement)
    store = LocalAdapterStore(root)
    engine = Engine(backbone, store, cache_max_slots=max(64, args.tasks))
    return backbone, store, engine, names


def time_adapters(engine: Engine, modes: dict, batches: list[list[int]]) -> dict[str, float]:
    """One untimed-by-the-table pass per adapter mode, with a wall-clock timer around every
    SlotPool.apply_adapters call: the fraction of the mode's time spent applying adapters."""
    pool, inner = engine.pool, engine.pool.apply_adapters
    spent = [0.0]

    def timed(*a, **kw):
        t0 = time.perf_counter()
        try:
            return inner(*a, **kw)
        finally:
            spent[0] += time.perf_counter() - t0

    pool.apply_adapters = timed  # an instance attribute shadows the method for this pool only
    try:
        share = {}
        for name in ("single_task", "mixed_segment", "mixed_gather"):
            spent[0] = 0.0
            t0 = time.perf_counter()
            for b in batches:
                modes[name](b)
            share[name] = round(spent[0] / (time.perf_counter() - t0), 4)
        return share
    finally:
        del pool.apply_adapters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=16)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--sentences", type=int, default=256)
    ap.add_argument("--passes", type=int, default=7)
    ap.add_argument("--bottleneck", type=int, default=64)
    ap.add_argument("--placement", default="houlsby")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--cold-rounds", type=int, default=8, help="full evict+reload rounds for cold-load timing")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads [default: what the service gives each forward worker on this "
                    "machine: the cores / 2 workers on CPU, torch's own on GPU]")
    ap.add_argument("--time-adapters", action="store_true",
                    help="after the timed passes, one more pass per adapter mode with a timer around the adapters "
                    "(SlotPool.apply_adapters): their share of the forward's time")
    ap.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction, default=True,
                    help="tune the host allocator as the service does (ADAPTER_SERVICE_KEEP_FREED_HOST_MEMORY)")
    args = ap.parse_args()
    threads = args.threads or forward_parallelism(ServiceSettings(), pick_device(args.device))[1]
    if threads:
        torch.set_num_threads(threads)
    allocator_tuned = keep_freed_memory() if args.keep_freed_memory else False

    backbone, store, engine, names = build(args)
    sents = peer_sentences_module()
    texts = sents.make_sentences(args.sentences, seed=0)
    tasks = sents.draw_tasks(args.sentences, names, seed=1)
    manifest = store.get_info(names[0], 1).manifest
    rows = engine.encode(manifest, texts)
    batches = [list(range(i, min(i + args.batch, len(rows)))) for i in range(0, len(rows), args.batch)]

    from transformers import AutoModel

    from service.modeling.backbone import resolve_backbone_path
    plain = AutoModel.from_pretrained(resolve_backbone_path(backbone.ref.id), attn_implementation="sdpa")
    plain.eval().requires_grad_(False).to(backbone.device, backbone.dtype)

    def plain_batch(b):
        batch = engine.encoder.collate([rows[i] for i in b], backbone.device)
        with torch.inference_mode():
            plain(**batch).last_hidden_state.float().cpu()

    def engine_batch(b, task_of, strategy):
        engine.strategy = strategy
        engine.run([RowRequest(task_of(i), 1 if task_of(i) else 0, rows[i]) for i in b])

    modes = {
        "hf_plain_backbone": plain_batch,
        "backbone_only": lambda b: engine_batch(b, lambda i: None, "segment"),
        "single_task": lambda b: engine_batch(b, lambda i: names[0], "segment"),
        "mixed_segment": lambda b: engine_batch(b, lambda i: tasks[i], "segment"),
        "mixed_gather": lambda b: engine_batch(b, lambda i: tasks[i], "gather"),
    }
    sync = torch.cuda.synchronize if backbone.device.type == "cuda" else (lambda: None)
    for fn in modes.values():  # warm-up (also loads every task)
        for b in batches:
            fn(b)
    # Modes are interleaved per batch, in a rotating order, so the machine's drift hits all of them alike;
    # each pass gives one time per mode and one ratio per mode (vs backbone-only in the same pass).
    names_m = list(modes)
    pass_times: list[dict[str, float]] = []
    for p in range(args.passes):
        acc = dict.fromkeys(modes, 0.0)
        for j, b in enumerate(batches):
            k = (p + j) % len(names_m)
            for name in names_m[k:] + names_m[:k]:
                sync()
                t0 = time.perf_counter()
                modes[name](b)
                sync()
                acc[name] += time.perf_counter() - t0
        pass_times.append(acc)
    seq_s = {k: len(rows) / median([t[k] for t in pass_times]) for k in modes}

    def ratio(mode: str, base: str = "backbone_only") -> float:
        return round(median([t[base] / t[mode] for t in pass_times]), 3)

    adapter_share = time_adapters(engine, modes, batches) if args.time_adapters else None

    # Cold loads: evict every task, then time each first acquire (store read + validation + slot copy).
    loads: list[float] = []
    for _ in range(args.cold_rounds):
        for name in names:
            engine.cache.invalidate(name)
        order = names[:]
        random.Random(len(loads)).shuffle(order)
        for name in order:
            t0 = time.perf_counter()
            entry = engine.cache.acquire(name, 1)
            loads.append(time.perf_counter() - t0)
            engine.cache.release(entry)

    report = {
        "machine": machine(),
        "device": str(backbone.device),
        "tasks": args.tasks, "batch": args.batch, "sentences": len(rows), "passes": args.passes,
        "bottleneck": args.bottleneck, "placement": args.placement,
        "distinct_tasks_per_batch": round(sum(len({tasks[i] for i in b}) for b in batches) / len(batches), 1),
        "seq_per_s": {k: round(v, 1) for k, v in seq_s.items()},
        "ratio_vs_backbone_only": {k: ratio(k) for k in modes},
        "ratio_backbone_only_over_hf_plain": ratio("backbone_only", "hf_plain_backbone"),
        "torch_threads": torch.get_num_threads(), "host_allocator_tuned": allocator_tuned,
        "auto_strategy": default_strategy(backbone.device),
        "adapter_time_share": adapter_share,
        "cold_load_ms": {"p50": round(percentile(loads, 50) * 1e3, 2), "p99": round(percentile(loads, 99) * 1e3, 2),
                         "n": len(loads)},
    }
    print(f"{'mode':<22}{'seq/s':>10}{'ratio vs backbone-only':>24}")
    for k, v in seq_s.items():
        print(f"{k:<22}{v:>10.1f}{report['ratio_vs_backbone_only'][k]:>24.3f}")
    auto = report["auto_strategy"]
    print(f"mixed-16 / backbone-only with the strategy auto picks here ({auto}): "
          f"{report['ratio_vs_backbone_only']['mixed_' + auto]:.3f}")
    print(f"torch threads {report['torch_threads']}, host allocator tuned: {allocator_tuned}")
    if adapter_share:
        print("share of the forward's time in the adapters: "
              + ", ".join(f"{k} {v * 100:.1f}%" for k, v in adapter_share.items()))
    print(f"cold load ms p50 {report['cold_load_ms']['p50']}  p99 {report['cold_load_ms']['p99']}  (n={len(loads)})")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
