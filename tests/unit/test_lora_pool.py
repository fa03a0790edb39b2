"""The LoRA pool's packed gather path against a rank growth between routing and forward."""

from __future__ import annotations

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
