"""The LoRA pool's packed gather path against a rank growth between routing and forward."""

from __future__ import annotations

import pytest
import torch

from service.bundles.layout import lora_key
from service.bundles.manifest import LoraConfig
from service.modeling.batch_plan import Segment
from service.modeling.slot_pool import SlotPool

D, LAYERS = 8, 2


def lora_tensors(rank: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {lora_key(layer, "query", part): torch.randn(*shape, generator=g)
            for layer in range(LAYERS) for part, shape in (("A", (D, rank)), ("B", (rank, D)))}


def test_a_routing_made_before_a_rank_growth_still_applies_exactly():
    """A packed gather routing is built while the pool's rank capacity is 8; another task of rank 12 then
    grows it before the forward runs: the forward reads the grown pool and each token gets its own delta."""
    norms = [(torch.ones(D), torch.zeros(D))] * (LAYERS * 2)
    pool = SlotPool(LAYERS, D, 4, device=torch.device("cpu"), dtype=torch.float32, base_norms=norms)
    small = LoraConfig(rank=4, scaling=2.0, targets=("query",))
    pool.write_lora(1, small, lora_tensors(4, seed=1))
    segments = [Segment(1, 0, 1), Segment(0, 1, 2)]  # a LoRA row (3 tokens), a plain row (2 tokens)
    routing = pool.routing_packed(segments, [0, 3, 5], "gather")
    pool.write_lora(2, LoraConfig(rank=12, scaling=1.0, targets=("query",)), lora_tensors(12, seed=2))
    assert pool.lora.rank_capacity == 12
    x = torch.randn(5, D)
    y = torch.zeros(5, D)
    with pool.route(routing):
        out = pool.lora.apply(0, "query", x, y.clone(), pool.current())  # the routing the layers see
    t = lora_tensors(4, seed=1)
    want = x[:3] @ t[lora_key(0, "query", "A")] @ (t[lora_key(0, "query", "B")] * small.scaling)
    torch.testing.assert_close(out[:3], want, atol=1e-5, rtol=1e-5)
    assert torch.equal(out[3:], y[3:])  # the plain row: exactly unchanged


@pytest.mark.parametrize("packed", [True, False])
def test_lora_reaches_exactly_the_lora_rows_wherever_they_sit_in_the_batch(packed):
    """`Routing.lora_span` holds every LoRA segment even where they are not together (a head-only task between
    two LoRA tasks, the plain backbone before them): each LoRA row gets its own delta, every other row nothing,
    in the gathered paths that read the span alone."""
    norms = [(torch.ones(D), torch.zeros(D))] * (LAYERS * 2)
    pool = SlotPool(LAYERS, D, 4, device=torch.device("cpu"), dtype=torch.float32, base_norms=norms)
    cfg = LoraConfig(rank=4, scaling=0.5, targets=("query",))
    pool.write_lora(1, cfg, lora_tensors(4, seed=1))
    pool.write_lora(3, cfg, lora_tensors(4, seed=3))
    pool.clear(2)  # a head-only task
    segments = [Segment(0, 0, 1), Segment(1, 1, 2), Segment(2, 2, 3), Segment(3, 3, 4)]
    lengths = [2, 3, 2, 3]
    g = torch.Generator().manual_seed(0)
    if packed:
        offsets = [0, 2, 5, 7, 10]
        routing = pool.routing_packed(segments, offsets, "gather")
        assert routing.lora_span == (2, 10)
        x = torch.randn(10, D, generator=g)
        rows = [x[a:b] for a, b in zip(offsets, offsets[1:])]
    else:
        routing = pool.routing(segments, "gather", lengths)
        assert routing.lora_span == (1, 4)
        x = torch.randn(4, 3, D, generator=g)
        rows = list(x)
    y = torch.full_like(x, 0.25)
    with pool.route(routing):
        out = pool.lora.apply(1, "query", x, y.clone(), pool.current())
    got = [out[a:b] for a, b in zip(offsets, offsets[1:])] if packed else list(out)
    for row, (slot, xs, ys) in enumerate(zip([0, 1, 2, 3], rows, got)):
        if slot in (1, 3):
            t = lora_tensors(4, seed=slot)
            want = 0.25 + xs @ t[lora_key(1, "query", "A")] @ (t[lora_key(1, "query", "B")] * cfg.scaling)
            torch.testing.assert_close(ys, want, atol=1e-5, rtol=1e-5)
        else:
            assert torch.equal(ys, torch.full_like(ys, 0.25)), row  # exactly unchanged
