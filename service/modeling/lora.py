"""Serving-side LoRA: slot-indexed low-rank weights beside the backbone's linear projections.

For a row whose slot `s` holds a LoRA task, each adapted projection `W` of layer `l` computes

    y = W x + b + (x @ A[l, s]) @ B[l, s]        A [in, r], B [r, out], B pre-multiplied by the task's scaling

(Hu et al. 2021; `scaling` = lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA, as PEFT computes it). Every
other slot holds zeros at that projection, so rows of bottleneck tasks, of the plain backbone (slot 0) and
of LoRA tasks that leave the projection alone get `W x + b` exactly. Narrower ranks are zero-padded to the
pool's rank capacity, which is exact too.

The rows' routing is the bottleneck path's (`slot_pool.Routing`), with the same strategy: `segment` runs one
matmul pair per LoRA segment on its contiguous rows (padded) or tokens (packed); `gather` gathers each row's
weights (padded: one batched matmul pair) or, packed, stacks the rank columns of the batch's n LoRA slots and
runs one matmul pair over every token:

    z = (x @ [A_1 | ... | A_n]) * M        y += z @ [B_1; ...; B_n]

where the 0/1 mask M keeps, for each token, only its own slot's r columns. Both read only the tokens (rows,
padded) of the LoRA segments, which the batch plan puts last (`batch_plan.plan_batch`): rows of other tasks
are left exactly as they were. Its cost is 2 * n * r * (in + out) per LoRA token, small while the batch's LoRA
ranks are small, and two matmuls instead of a gather of every LoRA segment's tokens.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from service.bundles.layout import lora_key
from service.bundles.manifest import LORA_TARGETS, LoraConfig

if TYPE_CHECKING:
    from service.modeling.slot_pool import Routing, SlotPool


class LoraPool:
    """LoRA weights of every resident LoRA task, per target projection, indexed by slot. A target's tensors
    are allocated when the first task adapting it is written (a deployment without LoRA pays nothing):
    A [layers, S, in, r_cap], B [layers, S, r_cap, out]."""

    def __init__(self, num_layers: int, dims: Mapping[str, tuple[int, int]], num_slots: int, *,
                 device: torch.device, dtype: torch.dtype, rank_capacity: int = 8):
        self.num_layers, self.dims, self.num_slots = num_layers, dict(dims), num_slots
        self.device, self.dtype, self.rank_capacity = device, dtype, rank_capacity
        self.A: dict[str, torch.Tensor] = {}
        self.B: dict[str, torch.Tensor] = {}
        self.targets: dict[int, frozenset[str]] = {}  # slot -> the targets it adapts

    def write(self, slot: int, cfg: LoraConfig, tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy one task's LoRA tensors (bundle layout names) into `slot` (free: no forward reads it). The
        caller has grown the pool first where `needs_growth` said so."""
        self.zero(slot)
        r = cfg.rank
        for target in cfg.targets:
            A = torch.stack([tensors[lora_key(layer, target, "A")] for layer in range(self.num_layers)])
            B = torch.stack([tensors[lora_key(layer, target, "B")] for layer in range(self.num_layers)])
            self.A[target][:, slot, :, :r].copy_(A.to(device=self.device, dtype=torch.float32))
            self.B[target][:, slot, :r, :].copy_((B.float() * cfg.scaling).to(device=self.device))
        self.targets[slot] = frozenset(cfg.targets)

    def bytes_after(self, cfg: LoraConfig) -> int:
        """Device bytes of the LoRA pool once `cfg` is written (every slot holds A and B of each allocated
        target at the rank capacity)."""
        rank = max(self.rank_capacity, cfg.rank)
        targets = set(self.A) | set(cfg.targets)
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return sum(self.num_layers * self.num_slots * rank * sum(self.dims[t]) * itemsize for t in targets)

    def needs_growth(self, cfg: LoraConfig) -> bool:
        """Whether writing `cfg` replaces pool tensors (a wider rank, or a target not allocated yet)."""
        return cfg.rank > self.rank_capacity or any(t not in self.A for t in cfg.targets)

    def grow(self, cfg: LoraConfig) -> None:
        """Widen the rank capacity and allocate missing targets (under the pool's exclusive lock)."""
        if cfg.rank > self.rank_capacity:
            extra = cfg.rank - self.rank_capacity
            self.rank_capacity = cfg.rank
            for target in list(self.A):
                self.A[target] = F.pad(self.A[target], (0, extra))
                self.B[target] = F.pad(self.B[target], (0, 0, 0, extra))
        for target in cfg.targets:
            self._allocate(target)

    def forget(self, slot: int) -> None:
        self.targets.pop(slot, None)

    def zero(self, slot: int) -> None:
        """No LoRA at `slot` (a bottleneck task moving in must read zeros in a gathered forward)."""
        for target in LORA_TARGETS:
            if target in self.A:
                self.A[target][:, slot].zero_()
                self.B[target][:, slot].zero_()

    def _allocate(self, target: str) -> None:
        if target in self.A:
            return
        n_in, n_out = self.dims[target]
        L, S, r = self.num_layers, self.num_slots, self.rank_capacity
        self.A[target] = torch.zeros(L, S, n_in, r, device=self.device, dtype=self.dtype)
        self.B[target] = torch.zeros(L, S, r, n_out, device=self.device, dtype=self.dtype)

    # --- the maths ---------------------------------------------------------------------------------

    def apply(self, layer: int, target: str, x: torch.Tensor, y: torch.Tensor, r: Routing) -> torch.Tensor:
        """y (the projection's output for input x; [B, T, out] padded or [N, out] packed, rows sorted by slot)
        plus each row's LoRA delta at this projection."""
        A, B = self.A.get(target), self.B.get(target)
        if A is None or B is None:
            return y
        A_l, B_l = A[layer], B[layer]  # [S, in, r], [S, r, out]
        a, b = r.lora_span  # the rows (padded) or tokens (packed) of the LoRA segments: the others get nothing
        if r.strategy == "gather" and not r.packed:
            idx = r.row_slots[a:b]  # each LoRA row's own weights, one batched matmul pair
            z = torch.bmm(x[a:b], A_l.index_select(0, idx))  # [rows, T, r]
            y[a:b].baddbmm_(z, B_l.index_select(0, idx))
            return y
        if r.strategy == "gather":
            # `routing_packed` sets the slots for packed gather routings with LoRA slots, `SlotPool.route` the mask
            assert r.lora_select is not None and r.lora_mask is not None
            sel = r.lora_select  # [n]: the batch's LoRA slots, their rank columns stacked
            A_sel = A_l.index_select(0, sel).permute(1, 0, 2).reshape(A_l.shape[1], -1)  # [in, n*r]
            B_sel = B_l.index_select(0, sel).reshape(-1, B_l.shape[2])  # [n*r, out]
            z = (x[a:b] @ A_sel).mul_(r.lora_mask.to(x.dtype))  # each token keeps its own slot's columns; others 0
            y[a:b].addmm_(z, B_sel)
            return y
        for i, seg in enumerate(r.segments):
            if target not in self.targets.get(seg.slot, ()):
                continue
            if r.packed:
                lo, hi = r.packed_bounds[i]
                y[lo:hi].addmm_(x[lo:hi] @ A_l[seg.slot], B_l[seg.slot])
            else:
                rows = slice(seg.start, seg.stop)
                xs = x[rows].reshape(-1, x.shape[-1])
                y[rows].view(-1, y.shape[-1]).addmm_(xs @ A_l[seg.slot], B_l[seg.slot])
        return y


class RoutedLinear(nn.Module):
    """A backbone projection that LoRA can adapt: its own output, plus each row's LoRA delta when a routed
    batch holds LoRA tasks."""

    def __init__(self, base: nn.Module, pool: SlotPool, layer: int, target: str):
        super().__init__()
        self.base = base
        self.layer, self.target = layer, target
        self._pool = [pool]  # a list, so the pool is not registered as a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.base(x)
        pool = self._pool[0]
        r = pool.current()
        if r is None or not r.lora_slots:
            return y
        return pool.lora.apply(self.layer, self.target, x, y, r)
