"""In-process engine benchmark: every precision and packing mode, side by side with ONNX Runtime.

    .venv/bin/python bench/engine.py [--tasks 16] [--batch 32] [--sentences 256] [--passes 7] [--threads N]
                                     [--precisions float32,bfloat16,int8] [--no-ort] [--device cpu|cuda]

Packaged all-MiniLM-L6-v2, 16 Houlsby tasks (bottleneck 64, classification heads, random weights),
batches of 32 seeded sentences of 8-30 words (the AdapterHub peer's generator). Tokenisation is done up
front and not timed, as in the peer's bench. One engine per precision (its own backbone load), each run
padded and packed: `backbone_only` (no adapter, mean-pooled embeddings) and `mixed` (each row its own of
the 16 tasks), plus `single_task` in float32 padded; ONNX Runtime (bench extra `onnxruntime`) on the
plain backbone exported from the same weights (float32, and int8 by its `quantize_dynamic`), same batches,
same threads, padded as ORT users run it. `auto_mixed` is the mode the service's `auto` picks on this
machine (precision by `service.modeling.precision`, packed). `mixed_lora`: the same draw over 16 tasks of
which `--lora-tasks` (8) carry LoRA (r = 8 on query + value, as imported from PEFT) and the rest bottleneck
adapters, reported against the same engine's backbone-only.

Modes run interleaved per batch in a rotating order; seq/s is the median over passes, each ratio the
median of the per-pass ratios against `float32_padded_backbone_only` (today's service baseline) in the
same pass. Agreement: every backbone-only mode's sentence embeddings (ONNX Runtime's too, mean-pooled
the same way) against float32 padded's, as 1 - cosine over all the sentences: what each speed costs in
accuracy, side by side. Prints a table and one JSON line. The process is set up as the service sets itself up (host
allocator keeps freed buffers, see service/host_memory.py); `--threads` sets torch's (and ORT's) intra-op
threads per forward, by default what the service gives each forward worker (on a 2-core CPU: 1).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

# Run as a script (`python bench/engine.py`), the import path starts at bench/, not at the repo
# root: put the root first, for the bench.*, service.* and tests.* imports.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.common import (
    machine,
    median,
    peer_sentences_module,
    percentile,
    random_lora_tasks,
    random_task_store,
)
from service.bundles.store import LocalAdapterStore
from service.host_memory import keep_freed_memory
from service.modeling.backbone import int8_gated, load_backbone, pick_device, resolve_backbone_path
from service.modeling.precision import choose_precision
from service.runtime.engine import Engine, RowRequest
from service.runtime.runtime import forward_parallelism
from service.settings import ServiceSettings

BASELINE = "float32_padded_backbone_only"


def ort_modes(batches_np: list[dict], threads: int, model_dir: str) -> dict:
    """ONNX Runtime sessions on the plain backbone: float32 and int8 (dynamic quantisation)."""
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from transformers import AutoModel

    class Plain(torch.nn.Module):  # keyword arguments in, the last hidden state out (for the tracer)
        def __init__(self):
            super().__init__()
            self.model = AutoModel.from_pretrained(model_dir, attn_implementation="eager").eval()

        def forward(self, *inputs):
            return self.model(**dict(zip(names, inputs))).last_hidden_state

    tmp = Path(tempfile.mkdtemp(prefix="bench-ort-"))
    names = list(batches_np[0])
    example = tuple(torch.from_numpy(batches_np[0][k]) for k in names)
    torch.onnx.export(Plain(), example, str(tmp / "fp32.onnx"), input_names=names, output_names=["last_hidden_state"],
                      dynamic_axes={k: {0: "b", 1: "s"} for k in [*names, "last_hidden_state"]}, opset_version=17,
                      dynamo=False)
    quantize_dynamic(str(tmp / "fp32.onnx"), str(tmp / "int8.onnx"), weight_type=QuantType.QInt8)
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sessions = {f"ort_{k}_padded_backbone_only": ort.InferenceSession(str(tmp / f"{k}.onnx"), so,
                                                                       providers=["CPUExecutionProvider"])
                for k in ("fp32", "int8")}
    return {name: (lambda b, s=s: s.run(None, batches_np[b])) for name, s in sessions.items()}


def time_adapters(engine: Engine, fn, batches: list[int]) -> float:
    """One extra pass of `fn` with a wall-clock timer around every SlotPool.apply_adapters call: the share of
    the time spent applying adapters."""
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
        t0 = time.perf_counter()
        for b in batches:
            fn(b)
        return round(spent[0] / (time.perf_counter() - t0), 4)
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
    ap.add_argument("--lora-tasks", type=int, default=8,
                    help="`*_mixed_lora` modes: this many of the --tasks are LoRA tasks (r = 8, query + value, as "
                    "imported from PEFT) and the rest bottleneck tasks, drawn like the mixed modes' [0: no such modes]")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precisions", default=None,
                    help="comma-separated precisions to run [default: float32,bfloat16,int8 on CPU; "
                    "float32,float16,bfloat16 on CUDA]")
    ap.add_argument("--ort", action=argparse.BooleanOptionalAction, default=True,
                    help="also time ONNX Runtime on the plain backbone (CPU; needs the bench extra)")
    ap.add_argument("--cold-rounds", type=int, default=8, help="full evict+reload rounds for cold-load timing")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads [default: what the service gives each forward worker on this "
                    "machine: the cores / 2 workers on CPU, torch's own on GPU]")
    ap.add_argument("--time-adapters", action="store_true",
                    help="after the timed passes, one more pass of each mixed mode with a timer around the "
                    "adapters (SlotPool.apply_adapters): their share of the forward's time")
    ap.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction, default=True,
                    help="tune the host allocator as the service does (ADAPTER_SERVICE_KEEP_FREED_HOST_MEMORY)")
    args = ap.parse_args()
    device = pick_device(args.device)
    threads = args.threads or forward_parallelism(ServiceSettings(), device)[1]
    if threads:
        torch.set_num_threads(threads)
    allocator_tuned = keep_freed_memory() if args.keep_freed_memory else False
    cpu = device.type == "cpu"
    precisions = (args.precisions or ("float32,bfloat16,int8" if cpu else "float32,float16,bfloat16")).split(",")

    root = Path(tempfile.mkdtemp(prefix="bench-store-"))
    engines: dict[str, Engine] = {}
    names: list[str] = []
    for prec in precisions:
        backbone = load_backbone(device=str(device), dtype=prec)
        if not names:
            auto = choose_precision("auto", device, int8_gated=int8_gated(backbone.ref.fingerprint))
            names = random_task_store(root, backbone.ref, args.tasks, args.bottleneck, args.placement)
            lora_names = random_lora_tasks(root, backbone.ref, args.lora_tasks) if args.lora_tasks else []
        for packing in ("off", "on"):
            engine = Engine(backbone if packing == "off" else load_backbone(device=str(device), dtype=prec),
                            LocalAdapterStore(root), cache_max_slots=max(64, args.tasks), packing=packing)
            engines[f"{prec}_{'packed' if engine.packed else 'padded'}"] = engine
    store = LocalAdapterStore(root)
    sents = peer_sentences_module()
    texts = sents.make_sentences(args.sentences, seed=0)
    tasks = sents.draw_tasks(args.sentences, names, seed=1)
    lora_mix = names[: args.tasks - len(lora_names)] + lora_names  # 16 tasks: bottleneck and LoRA
    lora_tasks = sents.draw_tasks(args.sentences, lora_mix, seed=1) if lora_names else []
    base_engine = engines["float32_padded"]
    rows = base_engine.encode(store.get_info(names[0], 1).manifest, texts)
    batches = [list(range(i, min(i + args.batch, len(rows)))) for i in range(0, len(rows), args.batch)]
    real = sum(len(r) for r in rows)
    padded = sum(len(b) * max(len(rows[i]) for i in b) for b in batches)

    def engine_batch(engine: Engine, b: list[int], task_of) -> list:
        return engine.run([RowRequest(task_of(i), 1 if task_of(i) else 0, rows[i]) for i in b])

    modes: dict = {}
    for key, engine in engines.items():
        modes[f"{key}_backbone_only"] = lambda b, e=engine: engine_batch(e, batches[b], lambda i: None)
        modes[f"{key}_mixed"] = lambda b, e=engine: engine_batch(e, batches[b], lambda i: tasks[i])
        if lora_names:
            modes[f"{key}_mixed_lora"] = lambda b, e=engine: engine_batch(e, batches[b], lambda i: lora_tasks[i])
    modes["float32_padded_single_task"] = lambda b: engine_batch(base_engine, batches[b], lambda i: names[0])
    np_batches: list[dict] = []
    if args.ort and cpu:
        for b in batches:
            t = base_engine.encoder.collate([rows[i] for i in b], torch.device("cpu"))
            np_batches.append({k: v.numpy() for k, v in t.items()})
        modes.update(ort_modes(np_batches, threads, resolve_backbone_path(base_engine.backbone.ref.id)))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    order = range(len(batches))
    for fn in modes.values():  # warm-up (also loads every task)
        for b in order:
            fn(b)
    # Modes are interleaved per batch, in a rotating order, so the machine's drift hits all of them alike;
    # each pass gives one time per mode and one ratio per mode (vs the baseline in the same pass).
    names_m = list(modes)
    pass_times: list[dict[str, float]] = []
    for p in range(args.passes):
        acc = dict.fromkeys(modes, 0.0)
        for j in order:
            k = (p + j) % len(names_m)
            for name in names_m[k:] + names_m[:k]:
                sync()
                t0 = time.perf_counter()
                modes[name](j)
                sync()
                acc[name] += time.perf_counter() - t0
        pass_times.append(acc)
    seq_s = {k: len(rows) / median([t[k] for t in pass_times]) for k in modes}

    def ratio(mode: str, base: str = BASELINE) -> float:
        return round(median([t[base] / t[mode] for t in pass_times]), 3)

    auto_key = f"{auto.mode}_{'packed' if engines[f'{auto.mode}_padded'].backbone.packable else 'padded'}"
    ratios = {k: ratio(k) for k in modes}
    adapter_share = ({k: time_adapters(engines[k], modes[f"{k}_mixed"], list(order)) for k in engines}
                     if args.time_adapters else None)

    # Cold loads: evict every task, then time each first acquire (store read + validation + slot copy).
    loads: list[float] = []
    cache = engines[auto_key].cache
    for _ in range(args.cold_rounds):
        for name in names:
            cache.invalidate(name)
        shuffled = names[:]
        random.Random(len(loads)).shuffle(shuffled)
        for name in shuffled:
            t0 = time.perf_counter()
            entry = cache.acquire(name, 1)
            loads.append(time.perf_counter() - t0)
            cache.release(entry)

    # Agreement: each backbone-only mode's sentence embeddings (mean-pooled, normalised, as the service answers
    # a row without a task) against float32 padded's, over every sentence: 1 - cosine, mean and max.
    def embeddings(mode: str) -> torch.Tensor:
        out = []
        for j, b in enumerate(batches):
            if mode.startswith("ort_"):
                hidden = torch.from_numpy(modes[mode](j)[0]).float()
                mask = torch.from_numpy(np_batches[j]["attention_mask"]).float().unsqueeze(-1)
                out.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
            else:
                engine = engines[mode.removesuffix("_backbone_only")]
                out.append(torch.tensor([r.prediction["embedding"] for r in engine_batch(engine, b, lambda i: None)]))
        return torch.cat(out)

    reference = embeddings(BASELINE)
    agreement = {}
    for mode in (m for m in modes if m.endswith("_backbone_only") and m != BASELINE):
        gap = 1 - torch.nn.functional.cosine_similarity(embeddings(mode), reference, dim=-1)
        agreement[mode] = {"mean": float(f"{gap.mean().item():.3g}"), "max": float(f"{gap.max().item():.3g}")}

    report = {
        "machine": machine(), "device": str(device), "command": "python " + " ".join(sys.argv),
        "tasks": args.tasks, "batch": args.batch, "sentences": len(rows), "passes": args.passes,
        "bottleneck": args.bottleneck, "placement": args.placement,
        "distinct_tasks_per_batch": round(sum(len({tasks[i] for i in b}) for b in batches) / len(batches), 1),
        "padding_share": round(1 - real / padded, 3),
        "auto": {"precision": auto.mode, "reason": auto.reason, "forward": auto_key.split("_")[1]},
        # each engine's own choice (an `int8` engine probes bfloat16 for its feed-forward output itself)
        "engines": {k: e.compute_info()["precision_reason"] for k, e in engines.items()},
        "seq_per_s": {k: round(v, 1) for k, v in seq_s.items()},
        f"ratio_vs_{BASELINE}": ratios,
        "auto_mixed_vs_baseline": ratios[f"{auto_key}_mixed"],
        "auto_mixed_vs_ort_int8": ratio(f"{auto_key}_mixed", "ort_int8_padded_backbone_only") if "ort_int8_padded_backbone_only" in modes else None,
        "auto_mixed_vs_auto_backbone_only": ratio(f"{auto_key}_mixed", f"{auto_key}_backbone_only"),
        "lora_tasks": len(lora_names),
        "mixed_lora_vs_same_mode_backbone_only": ({k: ratio(f"{k}_mixed_lora", f"{k}_backbone_only") for k in engines}
                                                  if lora_names else None),
        "torch_threads": torch.get_num_threads(), "host_allocator_tuned": allocator_tuned,
        "adapter_time_share": adapter_share,
        "embedding_error_vs_float32_padded": agreement,
        "cold_load_ms": {"p50": round(percentile(loads, 50) * 1e3, 2), "p99": round(percentile(loads, 99) * 1e3, 2),
                         "n": len(loads)},
    }
    print(f"{'mode':<36}{'seq/s':>10}{'x ' + BASELINE:>40}")
    for k, v in seq_s.items():
        print(f"{k:<36}{v:>10.1f}{ratios[k]:>40.3f}")
    print(f"auto here: {auto.mode} ({auto.reason}), {auto_key.split('_')[1]} forwards; padding share "
          f"{report['padding_share']}")
    print(f"auto mixed-{args.tasks} / float32 padded backbone-only: {report['auto_mixed_vs_baseline']:.3f}; "
          f"/ ORT int8: {report['auto_mixed_vs_ort_int8']}; / auto backbone-only: "
          f"{report['auto_mixed_vs_auto_backbone_only']:.3f}")
    if lora_names:
        print(f"mixed-{args.tasks} with {len(lora_names)} LoRA tasks (r = 8, query + value) / backbone-only, same "
              f"precision and forward: {report['mixed_lora_vs_same_mode_backbone_only']}")
    print(f"torch threads {report['torch_threads']}, host allocator tuned: {allocator_tuned}")
    if adapter_share:
        print("share of the mixed forward's time in the adapters: "
              + ", ".join(f"{k} {v * 100:.1f}%" for k, v in adapter_share.items()))
    print("sentence embeddings vs float32 padded's, 1 - cosine (mean / max over the sentences): "
          + ", ".join(f"{k.removesuffix('_backbone_only')} {v['mean']:.2g} / {v['max']:.2g}" for k, v in agreement.items()))
    print(f"cold load ms p50 {report['cold_load_ms']['p50']}  p99 {report['cold_load_ms']['p99']}  (n={len(loads)})")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
