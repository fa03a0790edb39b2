"""Memory kept per distinct matmul shape: why packed bfloat16 batches are rounded to size buckets.

    .venv/bin/python bench/shape_memory.py [--shapes 640] [--dtype bfloat16]

In one process, 1 torch thread: the resident set size (/proc) before and after running `--shapes` distinct
shapes of each op once, in the MiniLM sizes the engine uses: a linear layer 384 -> 1536 on [n, 384] inputs
(n = 100 .. 100 + shapes), the adapters' batched matmul [k, L, 384] x [k, 384, 64] (k 1..16, L steps of 4),
a small matmul [n, 384] x [384, 64], and scaled-dot-product attention [B, 12, T, 32]; then the same linear
shapes a second time (nothing new should be kept). Prints MiB per op and per shape, and one JSON line.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform

import torch
import torch.nn.functional as F


def rss_mib() -> float:
    with open(f"/proc/{os.getpid()}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", type=int, default=640)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    dt = getattr(torch, args.dtype)
    n = args.shapes
    linear = torch.nn.Linear(384, 1536).to(dt).eval()
    x = torch.randn(100 + n, 384, dtype=dt)
    w_bmm, w_mm = torch.randn(16, 384, 64, dtype=dt), torch.randn(384, 64, dtype=dt)
    bmm_shapes = list(itertools.product(range(1, 17), range(4, 4 + 4 * (n // 16 + 1), 4)))[:n]
    sdpa_shapes = list(itertools.product(range(1, 33), range(8, 8 + 2 * (n // 32 + 1), 2)))[:n]
    ops = {
        "linear [n,384]x[384,1536]": lambda: [linear(x[: 100 + i]) for i in range(n)],
        "bmm [k,L,384]x[k,384,64]": lambda: [torch.bmm(torch.randn(k, L, 384, dtype=dt), w_bmm[:k])
                                             for k, L in bmm_shapes],
        "mm [n,384]x[384,64]": lambda: [torch.mm(x[: 4 + i], w_mm) for i in range(n)],
        "sdpa [B,12,T,32]": lambda: [F.scaled_dot_product_attention(q, q, q) for q in
                                     (torch.randn(B, 12, T, 32, dtype=dt) for B, T in sdpa_shapes)],
        "linear, the same shapes again": lambda: [linear(x[: 100 + i]) for i in range(n)],
    }
    out = {}
    with torch.inference_mode():
        linear(x[:100])  # the first call's one-off setup is not counted
        for name, op in ops.items():
            before = rss_mib()
            op()
            grown = rss_mib() - before
            out[name] = {"mib": round(grown, 1), "mib_per_shape": round(grown / n, 3)}
            print(f"{name:<32} +{grown:8.1f} MiB  ({grown / n:.3f} MiB per shape, {n} shapes)", flush=True)
    print(json.dumps({"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                      "dtype": args.dtype, "shapes": n, "growth": out}))


if __name__ == "__main__":
    main()
