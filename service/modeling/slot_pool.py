"""Serving-side adapters: a preallocated slot pool and the routed layers that read it.

Every resident task owns one slot index. Each insertion point `p` (layer x {attn, ffn}) keeps its
weights for all slots in preallocated tensors, so loading a task is a copy into a free slot and the hot
path never allocates parameters. Layers only ever see slot indices; which task sits in which slot is the
cache's business (`service.runtime.cache`).

A forward is routed: the caller sorts rows by slot (`batch_plan.plan_batch`), opens `pool.route(routing)`
and runs the backbone once; each routed layer then applies, per row, the adapter of that row's slot.
Slot 0 is "no adapter": its weights stay zero, so rows routed there see the plain backbone.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Literal, cast

import torch
import torch.nn.functional as F
from torch import nn

from service.bundles.layout import adapter_key
from service.bundles.manifest import INSERTION_POINTS, LORA_TARGETS, Activation, AdapterConfig, LoraConfig
from service.modeling.backbone import ArchSpec, get_layers, get_submodule, set_submodule
from service.modeling.batch_plan import Piece, Segment, gather_pieces, round_up
from service.modeling.bottleneck import ACTIVATIONS
from service.modeling.lora import LoraPool, RoutedLinear

Strategy = Literal["segment", "gather"]
NO_ADAPTER = 0
Activate = Callable[[torch.Tensor], torch.Tensor]
# One slot's adapter at one point: down_w [d, m], down_b [m], up_w [m, d], up_b [d], activation
SlotView = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Activate]
# A separate slot's adapter at one point: its SlotView, then its own LayerNorms' (weight, bias) before and
# after (None where it has none) and their eps
Affine = tuple[torch.Tensor, torch.Tensor]
SeparateView = tuple[SlotView, Affine | None, Affine | None, float]


def default_strategy(device: torch.device, threads: int | None = None,
                     dtype: torch.dtype = torch.float32) -> Strategy:
    """The faster way to mix tasks in one forward, as measured by bench/engine.py (docs/benchmarks.md).

    CUDA: one gather of each task's (packed) or row's (padded) weights + batched matmul (few kernel
    launches). CPU in bfloat16: gather + batched matmul too (small bfloat16 matmuls have a high fixed cost
    each). CPU in float32 with one intra-op thread per forward (the server's default on small machines: 2
    workers x 1 thread): per-task segment matmuls on the real tokens only. CPU with more threads per forward:
    gather + bmm, because small per-task matmuls split badly across threads while a batched matmul hands
    whole rows to each thread."""
    if device.type == "cuda" or dtype is torch.bfloat16:
        return "gather"
    return "segment" if (threads or torch.get_num_threads()) <= 1 else "gather"


class SharedExclusiveLock:
    """Many routed forwards at once (shared), or one pool-tensor replacement alone (exclusive). A waiting
    exclusive holder goes first: under steady load, overlapping forwards would otherwise never all be out."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._exclusive_waiting = 0

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._exclusive and not self._exclusive_waiting)
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._exclusive_waiting += 1
            try:
                self._cond.wait_for(lambda: not self._exclusive and not self._shared)
            finally:
                self._exclusive_waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


@dataclass(frozen=True)
class SlotSpec:
    """What occupies a slot: enough to apply it without looking at the task."""

    bottleneck: int
    activation: Activation
    points: frozenset[str]
    has_norm: bool
    normed: bool = False  # reads the sub-layer's LayerNorm output (AdapterConfig.reads), applied by RoutedLayerNorm
    ln_before: bool = False  # LayerNorms of its own (AdapterConfig.ln_before / ln_after / ln_eps)
    ln_after: bool = False
    ln_eps: float = 1e-5

    @property
    def own_norms(self) -> bool:
        return self.ln_before or self.ln_after

    @property
    def separate(self) -> bool:
        """Applied segment by segment outside the batched paths (`SlotPool.apply_separate_adapters`,
        `apply_normed_adapters`): the batched paths read zeros at its slot."""
        return self.normed or self.own_norms


@dataclass(frozen=True)
class Routing:
    """Per-forward routing: rows are already sorted so that each segment is one slot."""

    segments: tuple[Segment, ...]
    row_slots: torch.Tensor  # [B] long, on the pool's device: slot of each (sorted) row
    specs: dict[int, SlotSpec]  # slot -> spec, for the slots in this batch (slot 0 absent)
    strategy: Strategy
    token_index: torch.Tensor | None = None  # [N] long: real (unpadded) tokens in the flattened [B*T] batch
    packed_bounds: tuple[tuple[int, int], ...] = ()  # per segment: its tokens' range in token_index / the packed batch
    packed: bool = False  # the forward itself is packed: layers see [N, d], segments are token ranges
    token_slots: torch.Tensor | None = None  # [N] long (packed forwards): slot of each token
    # Packed gather: the adapter segments' tokens cut into k pieces (`batch_plan.gather_pieces`) laid out as
    # [k, L] (padded with token 0, never read back)
    segment_slots: torch.Tensor | None = None  # [k] long: slot of each piece
    piece_activations: tuple[Activation | None, ...] = ()  # the activation of each piece (None: a filler), host-side
    segment_tokens: torch.Tensor | None = None  # [k * L] long: token of each place of the [k, L] layout
    real_places: torch.Tensor | None = None  # [n] long: the places of [k * L] that hold a real token
    real_tokens: torch.Tensor | None = None  # [n] long: the token at each of those places
    lora_slots: frozenset[int] = frozenset()  # the slots in this batch that hold LoRA tasks
    # The rows (padded) or tokens (packed) [a, b) that hold every LoRA segment (one range when the plan put them
    # last, `batch_plan.plan_batch`): the batched LoRA matmuls read these alone
    lora_span: tuple[int, int] = (0, 0)
    normed_slots: frozenset[int] = frozenset()  # the slots whose adapters read the LayerNorm output
    separate_slots: frozenset[int] = frozenset()  # projection-time slots applied apart (adapter LayerNorms)
    adapter_row_slots: torch.Tensor | None = None  # padded gather: row_slots with separate slots as 0 (None: same)
    # Packed gather with LoRA tasks (see `LoraPool.apply`): the batch's LoRA slots, whose rank columns are stacked
    lora_select: torch.Tensor | None = None
    lora_mask: torch.Tensor | None = None  # [b - a, n * rank capacity] over `lora_span`'s tokens: each one's own slot's
    # columns (set by `route`)

    @property
    def any_adapter(self) -> bool:
        return bool(self.specs)

    @property
    def any_norm(self) -> bool:
        return any(s.has_norm for s in self.specs.values())


class SlotPool:
    """Adapter weights of every resident task, per insertion point, indexed by slot.

    P = layers x 2 insertion points, S = slots (+1 for slot 0), d = hidden, m = bottleneck capacity (the
    widest resident bottleneck; narrower tasks are zero-padded, which is exact). Pfeiffer tasks leave their
    attention points at zero. Norm slots hold the backbone's own LayerNorm unless a task trains its own.
    """

    def __init__(
        self, num_layers: int, hidden: int, num_slots: int, *, device: torch.device, dtype: torch.dtype,
        base_norms: Sequence[tuple[torch.Tensor, torch.Tensor]], bottleneck_capacity: int = 64,
        lora_dims: dict[str, tuple[int, int]] | None = None,
    ):
        if num_slots < 1:
            raise ValueError("the pool needs at least one slot besides the no-adapter slot")
        self.num_layers, self.hidden, self.device, self.dtype = num_layers, hidden, device, dtype
        self.num_slots = num_slots + 1  # slot 0 = no adapter
        P, S, d, m = num_layers * len(INSERTION_POINTS), self.num_slots, hidden, bottleneck_capacity
        self.down_w = torch.zeros(P, S, d, m, device=device, dtype=dtype)  # [P, S, d, m]
        self.down_b = torch.zeros(P, S, m, device=device, dtype=dtype)  # [P, S, m]
        self.up_w = torch.zeros(P, S, m, d, device=device, dtype=dtype)  # [P, S, m, d]
        self.up_b = torch.zeros(P, S, d, device=device, dtype=dtype)  # [P, S, d]
        self._base_norm_w = torch.stack(  # [P, d]
            [w.detach().to(device=device, dtype=dtype) for w, _ in base_norms])
        self._base_norm_b = torch.stack(  # [P, d]
            [b.detach().to(device=device, dtype=dtype) for _, b in base_norms])
        self.norm_w = self._base_norm_w[:, None, :].repeat(1, S, 1).contiguous()  # [P, S, d]
        self.norm_b = self._base_norm_b[:, None, :].repeat(1, S, 1).contiguous()  # [P, S, d]
        self.specs: dict[int, SlotSpec] = {}
        # slot -> per point p: (down_w [d,m], down_b [m], up_w [m,d], up_b [d], activation) views, or None
        # where the slot has no adapter. Built at write time so the hot path does no tensor indexing.
        self._views: dict[int, list[SlotView | None]] = {}
        # the same for separate slots (adapters reading the norm output, or with LayerNorms of their own)
        self._separate_views: dict[int, list[SeparateView | None]] = {}
        # the adapters' own LayerNorms [P, S, d] (ln_before, ln_after: weight, bias), allocated by the first
        # task that has them (never replaced: views into them stay valid)
        self.own_norms: dict[str, torch.Tensor] = {}
        # Forwards hold it shared (several may run at once: each reads only its own pinned slots); a
        # capacity growth, which replaces the pool tensors, takes it exclusive.
        self.lock = SharedExclusiveLock()
        self._write_lock = threading.Lock()  # serialises slot writes
        self._local = threading.local()
        # LoRA tasks' weights, beside each target projection (`service.modeling.lora`); same slots
        self.lora = LoraPool(num_layers, lora_dims or {t: (hidden, hidden) for t in LORA_TARGETS}, self.num_slots,
                             device=device, dtype=dtype)

    @staticmethod
    def point_index(layer: int, point: str) -> int:
        return layer * len(INSERTION_POINTS) + INSERTION_POINTS.index(point)

    @property
    def bottleneck_capacity(self) -> int:
        capacity: int = self.down_w.shape[-1]
        return capacity

    # --- writes (cache loads and evictions) ---------------------------------------------------

    def write(self, slot: int, cfg: AdapterConfig, tensors: dict[str, torch.Tensor]) -> None:
        """Copy one task's adapter tensors (bundle layout names) into `slot`.

        The slot is free, so no in-flight row reads it and the copy needs no forward-exclusion; only a
        capacity growth (which replaces the pool tensors) waits for the running forwards to finish.
        """
        if not 0 < slot < self.num_slots:
            raise IndexError(f"slot {slot} out of range 1..{self.num_slots - 1}")
        with self._write_lock:
            if cfg.bottleneck > self.bottleneck_capacity:
                with self.lock.exclusive():
                    self._grow(cfg.bottleneck)
            self._zero(slot)
            self.lora.zero(slot)
            m = cfg.bottleneck
            keys = [(layer, point) for layer in range(self.num_layers) for point in cfg.points]
            idx = torch.tensor([self.point_index(layer, point) for layer, point in keys], device=self.device)

            def stacked(part: str) -> torch.Tensor:  # every insertion point's `part`, one tensor [points, ...]
                return torch.stack([tensors[adapter_key(layer, point, part)] for layer, point in keys]).to(
                    device=self.device, dtype=self.dtype)

            # One indexed copy per part (not one per part and point): a reload is mostly these copies.
            self.down_w[:, slot, :, :m].index_copy_(0, idx, stacked("down.weight"))
            self.down_b[:, slot, :m].index_copy_(0, idx, stacked("down.bias"))
            self.up_w[:, slot, :m, :].index_copy_(0, idx, stacked("up.weight"))
            self.up_b[:, slot].index_copy_(0, idx, stacked("up.bias"))
            if cfg.train_layernorm:
                self.norm_w[:, slot].index_copy_(0, idx, stacked("norm.weight"))
                self.norm_b[:, slot].index_copy_(0, idx, stacked("norm.bias"))
            for name, on in (("ln_before", cfg.ln_before), ("ln_after", cfg.ln_after)):
                if on:
                    for part in ("weight", "bias"):
                        self._own_norm(f"{name}.{part}")[:, slot].index_copy_(0, idx, stacked(f"{name}.{part}"))
            spec = SlotSpec(m, cfg.activation, frozenset(cfg.points), cfg.train_layernorm, cfg.reads == "normed",
                            cfg.ln_before, cfg.ln_after, cfg.ln_eps)
            self._set_views(slot, spec)
            self.specs[slot] = spec

    def write_lora(self, slot: int, cfg: LoraConfig, tensors: dict[str, torch.Tensor]) -> None:
        """Copy one LoRA task's tensors (bundle layout names) into `slot`; its bottleneck weights are zero."""
        if not 0 < slot < self.num_slots:
            raise IndexError(f"slot {slot} out of range 1..{self.num_slots - 1}")
        with self._write_lock:
            if self.lora.needs_growth(cfg):
                with self.lock.exclusive():
                    self.lora.grow(cfg)
            self._zero(slot)
            self.lora.write(slot, cfg, tensors)

    def clear(self, slot: int) -> None:
        """`slot` holds no adapter at all (a head-only task moves in): every weight of it zero, its norms the
        backbone's, so that gathered forwards, which read every row's slot, read nothing stale there."""
        if not 0 < slot < self.num_slots:
            raise IndexError(f"slot {slot} out of range 1..{self.num_slots - 1}")
        with self._write_lock:
            self.forget(slot)
            self._zero(slot)
            self.lora.zero(slot)

    def forget(self, slot: int) -> None:
        """Mark `slot` free of any adapter (its stale weights are zeroed by the next write or `clear`)."""
        self.specs.pop(slot, None)
        self._views.pop(slot, None)
        self._separate_views.pop(slot, None)
        self.lora.forget(slot)

    def _own_norm(self, name: str) -> torch.Tensor:
        """The pool tensor [P, S, d] of the adapters' own LayerNorm part `name` (allocated on first use)."""
        if name not in self.own_norms:
            P, S, d = self.down_w.shape[0], self.num_slots, self.hidden
            fill = 1.0 if name.endswith("weight") else 0.0
            self.own_norms[name] = torch.full((P, S, d), fill, device=self.device, dtype=self.dtype)
        return self.own_norms[name]

    def _set_views(self, slot: int, spec: SlotSpec) -> None:
        """Build `slot`'s views: batched slots in `_views`, separate ones in `_separate_views`."""
        if not spec.separate:
            self._views[slot] = self._slot_views(slot, spec)
            self._separate_views.pop(slot, None)
            return
        views: list[SeparateView | None] = []
        for p, view in enumerate(self._slot_views(slot, spec)):
            pre = (self.own_norms["ln_before.weight"][p, slot], self.own_norms["ln_before.bias"][p, slot]) \
                if spec.ln_before else None
            post = (self.own_norms["ln_after.weight"][p, slot], self.own_norms["ln_after.bias"][p, slot]) \
                if spec.ln_after else None
            views.append(None if view is None else (view, pre, post, spec.ln_eps))
        self._separate_views[slot] = views
        self._views.pop(slot, None)

    def _slot_views(self, slot: int, spec: SlotSpec) -> list[SlotView | None]:
        act, m = ACTIVATIONS[spec.activation], spec.bottleneck
        views: list[SlotView | None] = []
        for p in range(self.down_w.shape[0]):
            if INSERTION_POINTS[p % len(INSERTION_POINTS)] not in spec.points:
                views.append(None)
                continue
            views.append((self.down_w[p, slot, :, :m], self.down_b[p, slot, :m], self.up_w[p, slot, :m, :],
                          self.up_b[p, slot], act))
        return views

    def _zero(self, slot: int) -> None:
        for t in (self.down_w, self.down_b, self.up_w, self.up_b):
            t[:, slot].zero_()
        self.norm_w[:, slot].copy_(self._base_norm_w)
        self.norm_b[:, slot].copy_(self._base_norm_b)
        for name, t in self.own_norms.items():
            t[:, slot].fill_(1.0 if name.endswith("weight") else 0.0)

    def _grow(self, bottleneck: int) -> None:
        """Widen the bottleneck capacity (rare: a task with a larger m than any before). Zero-padding is exact:
        extra down columns give act(0) = 0, which meets zero up rows."""
        extra = bottleneck - self.bottleneck_capacity
        self.down_w = F.pad(self.down_w, (0, extra))
        self.down_b = F.pad(self.down_b, (0, extra))
        self.up_w = F.pad(self.up_w, (0, 0, 0, extra))
        # a copy: an eviction may `forget` a slot meanwhile (it takes no write lock)
        specs = list(self.specs.items())
        for slot, spec in specs:
            self._set_views(slot, spec)

    # --- routing -------------------------------------------------------------------------------

    def routing(
        self, segments: Sequence[Segment], strategy: Strategy, lengths: Sequence[int] | None = None,
        pack_below: float = 0.9,
    ) -> Routing:
        """Routing for rows already sorted by slot (see `batch_plan.plan_batch`).

        With the rows' token `lengths`, the segment strategy computes adapters on real tokens only when
        padding exceeds `1 - pack_below` of the batch (pad positions never reach a real token: attention
        masks them out)."""
        specs, normed, separate = self._batch_specs(segments)
        lora = frozenset(s.slot for s in segments if s.slot in self.lora.targets)
        row_slots = torch.tensor(
            [s.slot for s in segments for _ in range(s.stop - s.start)], dtype=torch.long, device=self.device
        )
        apart = normed | separate
        adapter_rows = None if not apart else torch.tensor(  # the batched paths read zeros at separate slots
            [NO_ADAPTER if s.slot in apart else s.slot for s in segments for _ in range(s.stop - s.start)],
            dtype=torch.long, device=self.device)
        token_index: torch.Tensor | None = None
        bounds: tuple[tuple[int, int], ...] = ()
        if strategy == "segment" and lengths and specs:
            T = max(lengths)
            if sum(lengths) < pack_below * T * len(lengths):
                token_index = torch.cat([torch.arange(i * T, i * T + n) for i, n in enumerate(lengths)])
                token_index = token_index.to(self.device)
                ends = torch.tensor(lengths).cumsum(0).tolist()
                bounds = tuple((ends[s.start - 1] if s.start else 0, ends[s.stop - 1]) for s in segments)
        return Routing(tuple(segments), row_slots, specs, strategy, token_index, bounds, lora_slots=lora,
                       normed_slots=normed, separate_slots=separate, adapter_row_slots=adapter_rows,
                       lora_span=_span([(s.start, s.stop) for s in segments if s.slot in lora]))

    def routing_packed(self, segments: Sequence[Segment], offsets: Sequence[int], strategy: Strategy,
                       total_tokens: int | None = None, bucket_shapes: bool = False) -> Routing:
        """Routing for a packed forward (`service.modeling.packed`) of rows sorted by slot: each segment is
        the contiguous token range [offsets[seg.start], offsets[seg.stop]). `segment`: one matmul pair per
        task; `gather`: the tasks' tokens laid out as [k pieces, L], one batched matmul pair. Tokens
        past the segments, up to `total_tokens` (a batch padded to a size bucket), get no adapter.
        `bucket_shapes` rounds the gather layout up to k a multiple of 4 and L of 16, so that batches repeat
        a few matmul shapes (see `Engine.token_bucket`). The gather layout's rows are pieces of the tasks'
        segments, cut where that pads less than it costs (`batch_plan.gather_pieces`)."""
        specs, normed, separate = self._batch_specs(segments)
        lora = frozenset(s.slot for s in segments if s.slot in self.lora.targets)
        slots = torch.tensor([s.slot for s in segments])
        counts = torch.tensor([offsets[s.stop] - offsets[s.start] for s in segments])
        pad = 0 if total_tokens is None else total_tokens - int(counts.sum())
        row_slots = torch.tensor([s.slot for s in segments for _ in range(s.stop - s.start)], dtype=torch.long)
        bounds = tuple((offsets[s.start], offsets[s.stop]) for s in segments)
        gather: dict[str, torch.Tensor] = {}
        activations: tuple[Activation | None, ...] = ()
        round_k, round_L = (4, 16) if bucket_shapes else (1, 1)
        pieces = [] if strategy != "gather" else gather_pieces(
            [Piece(s.slot, a, b) for s, (a, b) in zip(segments, bounds) if s.slot in specs],
            round_pieces=round_k, round_length=round_L)
        if pieces:
            # the [k, L] layout, rounded up (filler pieces: slot 0, zero weights, never read)
            L = round_up(max(p.stop - p.start for p in pieces), round_L)
            k = round_up(len(pieces), round_k)
            places = torch.full((k, L), 0, dtype=torch.long)
            for i, p in enumerate(pieces):
                places[i, : p.stop - p.start] = torch.arange(p.start, p.stop)
            real = torch.tensor([i * L + t for i, p in enumerate(pieces) for t in range(p.stop - p.start)])
            seg_slots = [p.slot for p in pieces] + [NO_ADAPTER] * (k - len(pieces))
            activations = tuple(specs[slot].activation if slot in specs else None for slot in seg_slots)
            gather = {"segment_slots": torch.tensor(seg_slots), "segment_tokens": places.view(-1), "real_places": real,
                      "real_tokens": torch.cat([torch.arange(p.start, p.stop) for p in pieces])}
        token_slots = F.pad(slots.repeat_interleave(counts), (0, pad), value=NO_ADAPTER).to(self.device)
        return Routing(tuple(segments), row_slots.to(self.device), specs, strategy, None, bounds, packed=True,
                       lora_slots=lora, normed_slots=normed, separate_slots=separate, token_slots=token_slots,
                       lora_span=_span([b for s, b in zip(segments, bounds) if s.slot in lora]),
                       piece_activations=activations, **{k: v.to(self.device) for k, v in gather.items()},
                       **self._lora_columns(lora, strategy))

    def _lora_columns(self, lora: frozenset[int], strategy: Strategy) -> dict[str, torch.Tensor]:
        """Packed gather: the batch's LoRA slots, in the order their rank columns are stacked (the mask that
        picks each token's columns is built by `route`, once a forward, at the rank capacity it reads under the lock)."""
        if strategy != "gather" or not lora:
            return {}
        return {"lora_select": torch.tensor(sorted(lora), dtype=torch.long, device=self.device)}

    def _batch_specs(self, segments: Sequence[Segment]
                     ) -> tuple[dict[int, SlotSpec], frozenset[int], frozenset[int]]:
        """(slot -> spec of the batch's adapters the batched paths apply at the projection, the slots whose
        adapters read the LayerNorm output instead, the projection-time slots applied apart)."""
        specs = {s.slot: spec for s in segments if (spec := self.specs.get(s.slot)) is not None}
        normed = frozenset(slot for slot, spec in specs.items() if spec.normed)
        separate = frozenset(slot for slot, spec in specs.items() if spec.separate and not spec.normed)
        batched = {slot: spec for slot, spec in specs.items() if not spec.separate}
        return batched, normed, separate

    @contextlib.contextmanager
    def route(self, routing: Routing) -> Iterator[None]:
        """Route the forwards this thread runs inside the block (other threads may route their own)."""
        with self.lock.shared():
            if routing.lora_select is not None and routing.token_slots is not None:
                # at the rank capacity read under the lock, which no growth changes until the forward ends
                columns = routing.lora_select.repeat_interleave(self.lora.rank_capacity)
                a, b = routing.lora_span
                mask = (routing.token_slots[a:b].unsqueeze(-1) == columns).to(self.dtype)
                routing = replace(routing, lora_mask=mask)
            self._local.routing = routing
            try:
                yield
            finally:
                self._local.routing = None

    def current(self) -> Routing | None:
        routing: Routing | None = getattr(self._local, "routing", None)
        return routing

    # --- the maths -----------------------------------------------------------------------------

    def apply_adapters(self, p: int, h: torch.Tensor, r: Routing) -> torch.Tensor:
        """h [B, T, d] (output of the projection, rows sorted by slot), or [N, d] in a packed forward ->
        h + adapter(h), per row's slot: adapter(x) = act(x @ down_w + down_b) @ up_w + up_b."""
        if r.packed:
            return self._apply_packed(p, h, r)
        if r.strategy == "gather":
            return self._apply_gather(p, h, r)
        _, T, d = h.shape
        h2 = h.view(-1, d)
        token_index = r.token_index
        packed = token_index is not None
        x = h2.index_select(0, token_index) if token_index is not None else h2  # [N, d]
        todo = []
        for i, seg in enumerate(r.segments):
            views = self._views.get(seg.slot)
            v = views[p] if views is not None else None
            if v is not None:
                a, b = r.packed_bounds[i] if packed else (seg.start * T, seg.stop * T)
                todo.append((a, b, v))
        if not todo:
            return h
        z = self._down_activated(x, todo)
        if token_index is not None:
            # the adapters' outputs y [N, d], added at the real tokens' places; 0 where no adapter
            covered = sum(b - a for a, b, _ in todo) == x.shape[0]
            y = torch.empty_like(x) if covered else torch.zeros_like(x)
            for a, b, (down_w, _, up_w, up_b, _) in todo:
                torch.addmm(up_b, z[a:b, : down_w.shape[1]], up_w, out=y[a:b])
            h2.index_add_(0, token_index, y)
        else:  # in place
            for a, b, (down_w, _, up_w, _, _) in todo:
                x[a:b].addmm_(z[a:b, : down_w.shape[1]], up_w)
            rows = r.row_slots if r.adapter_row_slots is None else r.adapter_row_slots  # normed slots: no bias here
            h.add_(self.up_b[p].index_select(0, rows).unsqueeze(1))
        return h

    def _apply_packed(self, p: int, h: torch.Tensor, r: Routing) -> torch.Tensor:
        """h [N, d] of a packed forward: each segment's contiguous tokens through its slot's adapter, in place."""
        if r.strategy == "gather" and r.segment_slots is not None:
            idx = r.segment_slots  # [k]
            # `routing_packed` sets the four gather fields together
            assert r.segment_tokens is not None and r.real_tokens is not None and r.real_places is not None
            k, d = idx.shape[0], h.shape[1]
            xs = h.index_select(0, r.segment_tokens).view(k, -1, d)  # [k, L, d]
            z = torch.baddbmm(self.down_b[p].index_select(0, idx).unsqueeze(1), xs, self.down_w[p].index_select(0, idx))
            z = self._activate_segments(z, r)
            y = torch.baddbmm(self.up_b[p].index_select(0, idx).unsqueeze(1), z, self.up_w[p].index_select(0, idx))
            return h.index_add_(0, r.real_tokens, y.view(-1, d).index_select(0, r.real_places))
        todo = []
        for (a, b), seg in zip(r.packed_bounds, r.segments):
            views = self._views.get(seg.slot)
            v = views[p] if views is not None else None
            if v is not None:
                todo.append((a, b, v))
        if not todo:
            return h
        z = self._down_activated(h, todo)
        for a, b, (down_w, _, up_w, up_b, _) in todo:
            h[a:b].addmm_(z[a:b, : down_w.shape[1]], up_w).add_(up_b)
        return h

    def _down_activated(self, x: torch.Tensor, todo: list[tuple[int, int, SlotView]]) -> torch.Tensor:
        """z [N, m] = act(x[a:b] @ down_w + down_b) for each segment (a, b) of `todo`, in one buffer, so that one
        activation call covers every segment when their tasks agree on it (as they usually do); rows of
        segments without an adapter here hold garbage and are never read."""
        z = torch.empty(x.shape[0], self.bottleneck_capacity, device=x.device, dtype=x.dtype)
        for a, b, (down_w, down_b, _, _, _) in todo:
            torch.addmm(down_b, x[a:b], down_w, out=z[a:b, : down_w.shape[1]])
        if len({v[4] for _, _, v in todo}) == 1:
            return todo[0][2][4](z)
        for a, b, (down_w, _, _, _, act) in todo:
            z[a:b, : down_w.shape[1]] = act(z[a:b, : down_w.shape[1]])
        return z

    def _activate(self, z: torch.Tensor, r: Routing) -> torch.Tensor:
        """Each row's activation (one call when the batch's tasks agree, as they usually do)."""
        acts = {spec.activation for spec in r.specs.values()}
        if len(acts) == 1:
            return ACTIVATIONS[acts.pop()](z)
        for seg in r.segments:
            spec = r.specs.get(seg.slot)
            if spec is not None:
                z[seg.start : seg.stop] = ACTIVATIONS[spec.activation](z[seg.start : seg.stop])
        return z

    @staticmethod
    def _activate_segments(z: torch.Tensor, r: Routing) -> torch.Tensor:
        """z [k, L, m] of a packed gather: each piece's activation (one call when the tasks agree), as the routing
        lists them host-side (reading the device's piece slots back would wait for the GPU at every layer)."""
        acts = r.piece_activations
        if len(set(acts) - {None}) == 1:  # filler segments (None) are never read: any activation will do
            return ACTIVATIONS[next(a for a in acts if a is not None)](z)
        for i, act in enumerate(acts):
            if act is not None:
                z[i] = ACTIVATIONS[act](z[i])
        return z

    def _apply_gather(self, p: int, h: torch.Tensor, r: Routing) -> torch.Tensor:
        idx = r.row_slots if r.adapter_row_slots is None else r.adapter_row_slots  # [B]
        z = torch.baddbmm(self.down_b[p].index_select(0, idx).unsqueeze(1), h, self.down_w[p].index_select(0, idx))
        z = self._activate(z, r)
        h.baddbmm_(z, self.up_w[p].index_select(0, idx))
        h.add_(self.up_b[p].index_select(0, idx).unsqueeze(1))
        return h

    def apply_normed_adapters(self, p: int, z: torch.Tensor, eps: float, r: Routing) -> torch.Tensor:
        """z (the sub-layer's output plus its input, rows sorted by slot; [B, T, d] or packed [N, d]) plus, for
        the rows of slots whose adapters read the LayerNorm output, adapter(LN(z)) with the backbone's
        LayerNorm: the caller's LayerNorm then gives LN(z + adapter(LN(z))). In place, segment by segment."""
        d = z.shape[-1]
        for zs, v in self._separate_segments(p, z, r, r.normed_slots):
            zs.add_(self._separate_adapter(F.layer_norm(zs, (d,), self._base_norm_w[p], self._base_norm_b[p], eps), v))
        return z

    def apply_separate_adapters(self, p: int, h: torch.Tensor, r: Routing) -> torch.Tensor:
        """h (the projection's output, [B, T, d] or packed [N, d]) plus, for the rows of `r.separate_slots`,
        their adapter of h (with its own LayerNorms). In place, segment by segment."""
        for hs, v in self._separate_segments(p, h, r, r.separate_slots):
            hs.add_(self._separate_adapter(hs, v))
        return h

    def _separate_segments(self, p: int, x: torch.Tensor, r: Routing, slots: frozenset[int]
                           ) -> Iterator[tuple[torch.Tensor, SeparateView]]:
        """(the [n, d] view of x holding a segment's tokens, its slot's view at point p) for each segment of
        `slots` with an adapter at p."""
        d = x.shape[-1]
        for i, seg in enumerate(r.segments):
            views = self._separate_views.get(seg.slot) if seg.slot in slots else None
            v = views[p] if views is not None else None
            if v is not None:
                yield (x[r.packed_bounds[i][0] : r.packed_bounds[i][1]] if r.packed
                       else x[seg.start : seg.stop].view(-1, d)), v

    @staticmethod
    def _separate_adapter(x: torch.Tensor, v: SeparateView) -> torch.Tensor:
        """LN_after(act(LN_before(x) @ down_w + down_b) @ up_w + up_b), each LayerNorm only where the task has
        it (AdapterHub's ln_before / ln_after; the scaling is in the up-projection)."""
        (down_w, down_b, up_w, up_b, act), before, after, eps = v
        d = x.shape[-1]
        a = F.layer_norm(x, (d,), before[0], before[1], eps) if before is not None else x
        u = torch.addmm(up_b, act(torch.addmm(down_b, a, down_w)), up_w)
        return F.layer_norm(u, (d,), after[0], after[1], eps) if after is not None else u

    def apply_norm(self, p: int, x: torch.Tensor, eps: float, r: Routing) -> torch.Tensor:
        """LayerNorm with each row's slot's affine parameters (the backbone's own where a task has none)."""
        y = F.layer_norm(x, (x.shape[-1],), None, None, eps)
        if r.packed:  # [N, d]: per token
            assert r.token_slots is not None  # `routing_packed` sets it
            return torch.addcmul(self.norm_b[p].index_select(0, r.token_slots), y,
                                 self.norm_w[p].index_select(0, r.token_slots))
        return torch.addcmul(
            self.norm_b[p].index_select(0, r.row_slots).unsqueeze(1), y,
            self.norm_w[p].index_select(0, r.row_slots).unsqueeze(1),
        )


def _span(ranges: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The smallest range [a, b) holding every one of `ranges` ((0, 0) for none)."""
    return (min(a for a, _ in ranges), max(b for _, b in ranges)) if ranges else (0, 0)


class RoutedProjection(nn.Module):
    """The backbone's output projection, followed by each row's adapter when a routing is open."""

    def __init__(self, base: nn.Module, pool: SlotPool, layer: int, point: str):
        super().__init__()
        self.base = base
        self.p = SlotPool.point_index(layer, point)
        self._pool = [pool]  # a list, so the pool is not registered as a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h: torch.Tensor = self.base(x)
        r = self._pool[0].current()
        if r is None:
            return h
        if r.any_adapter:
            h = self._pool[0].apply_adapters(self.p, h, r)
        if r.separate_slots:
            h = self._pool[0].apply_separate_adapters(self.p, h, r)
        return h


class RoutedLayerNorm(nn.Module):
    """The backbone's post-residual LayerNorm; per-row affine parameters only when a routed task trains its own."""

    def __init__(self, base: nn.LayerNorm, pool: SlotPool, layer: int, point: str):
        super().__init__()
        self.base = base
        self.p = SlotPool.point_index(layer, point)
        self._pool = [pool]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self._pool[0].current()
        if r is not None and r.normed_slots:
            x = self._pool[0].apply_normed_adapters(self.p, x, self.base.eps, r)
        if r is None or not r.any_norm:
            y: torch.Tensor = self.base(x)
            return y
        return self._pool[0].apply_norm(self.p, x, self.base.eps, r)


def install_slot_pool(
    model: nn.Module, spec: ArchSpec, num_slots: int, *, device: torch.device, dtype: torch.dtype,
    bottleneck_capacity: int = 64,
) -> SlotPool:
    """Replace every insertion point of `model` with routed layers reading one new pool, and every LoRA
    target projection with a routed linear reading its LoRA part (idempotent per model)."""
    layers = get_layers(model, spec)
    norms: list[tuple[torch.Tensor, torch.Tensor]] = []
    for layer in layers:
        for point in INSERTION_POINTS:
            norm = _base_norm(layer, spec.norm(point))
            norms.append((norm.weight, norm.bias))
    hidden = norms[0][0].shape[0]
    lora_dims = {t: _linear_dims(_base_linear(layers[0], spec.lora_target(t))) for t in LORA_TARGETS}
    pool = SlotPool(len(layers), hidden, num_slots, device=device, dtype=dtype, base_norms=norms,
                    bottleneck_capacity=bottleneck_capacity, lora_dims=lora_dims)
    for i, layer in enumerate(layers):
        for target in LORA_TARGETS:  # first: the attention and feed-forward outputs are wrapped again below
            path = spec.lora_target(target)
            routed = RoutedLinear(_base_linear(layer, path), pool, i, target)
            current = get_submodule(layer, path)
            if isinstance(current, RoutedProjection):
                current.base = routed
            else:
                set_submodule(layer, path, routed)
        for point in INSERTION_POINTS:
            proj = get_submodule(layer, spec.projection(point))
            proj = proj.base if isinstance(proj, RoutedProjection) else proj
            set_submodule(layer, spec.projection(point), RoutedProjection(proj, pool, i, point))
            norm = _base_norm(layer, spec.norm(point))
            set_submodule(layer, spec.norm(point), RoutedLayerNorm(norm, pool, i, point))
    return pool


def _base_linear(layer: nn.Module, path: str) -> nn.Module:
    """The backbone's own projection at `path` (unwrapped when a pool was installed before)."""
    module = get_submodule(layer, path)
    if isinstance(module, RoutedProjection):
        module = module.base
    return module.base if isinstance(module, RoutedLinear) else module


def _linear_dims(module: nn.Module) -> tuple[int, int]:
    """(in, out) features of a projection (nn.Linear, or its dynamically quantised form)."""
    return int(getattr(module, "in_features")), int(getattr(module, "out_features"))  # noqa: B009


def _base_norm(layer: nn.Module, path: str) -> nn.LayerNorm:
    """The backbone's own LayerNorm at `path` (unwrapped when a pool was installed before)."""
    norm = get_submodule(layer, path)
    # cast: at `spec.norm(point)` every supported architecture has an nn.LayerNorm
    return norm.base if isinstance(norm, RoutedLayerNorm) else cast(nn.LayerNorm, norm)
