"""The engine: rows of many tasks in, predictions out, through ONE backbone forward per batch.

`Engine.run(rows)`: pin each row's `task@version` in the cache (loading on a miss) -> plan the batch (sort
by slot) -> one routed backbone forward -> each segment through its task's head -> post-process -> unpin.
A row whose task fails to load fails alone; the other rows of the batch are served.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F

from service.bundles.codec import Bundle, decode_bundle
from service.bundles.manifest import AdapterConfig, Manifest
from service.bundles.store import AdapterStore
from service.errors import BundleInvalid, ConfigurationError, InvalidInput, ServiceError
from service.kinds.heads import SequenceHead, TaskHead, pool_tokens
from service.modeling.backbone import Backbone
from service.modeling.batch_plan import BatchPlan, Segment, plan_batch
from service.modeling.encoding import EncodedRow, Encoder
from service.modeling.packed import Packing, packed_forward
from service.modeling.slot_pool import NO_ADAPTER, Strategy, default_strategy, install_slot_pool
from service.runtime.cache import AdapterCache, CacheEntry
from service.runtime.host_cache import HostBundleCache

log = logging.getLogger(__name__)

# A forward's outputs: pool(kind) -> [B, d] pooled rows, and token_rows(head, segment) -> one head's
# token-level logits per row of the segment
PoolRows = Callable[[str], torch.Tensor]
TokenRows = Callable[[TaskHead, Segment], list[torch.Tensor]]
# A row's (task, version): the key of a batch's pinned cache entries (rows with task None look up nothing)
RowKey = tuple[str | None, int]
Pinned = dict[RowKey, CacheEntry]


@dataclass(frozen=True)
class RowRequest:
    """One input row for `task@version`; `task=None` asks for the plain backbone (a sentence embedding)."""

    task: str | None
    version: int
    row: EncodedRow
    footprint: int = 0  # device bytes of the task's weights (`AdapterCache.footprint`): the batcher's admission

    @property
    def key(self) -> tuple[str, int] | None:
        """The cache key of the row's task version (None: the plain backbone)."""
        return None if self.task is None else (self.task, self.version)


@dataclass(frozen=True)
class PlannedBatch:
    """What one forward computes: the rows sorted by slot (`plan.order`), so that each task version's rows
    form one contiguous segment (`plan.segments`), LoRA tasks' segments last, and each segment's head (None: the
    plain backbone)."""

    rows: list[EncodedRow]  # in plan order
    positions: list[int]  # positions[k]: index, in the caller's request list, of the k-th planned row
    plan: BatchPlan
    heads: list[TaskHead | None]  # one per segment

    @classmethod
    def of(cls, requests: Sequence[RowRequest], live: Sequence[int], entries: Pinned) -> PlannedBatch:
        """Plan the `live` rows of `requests` with their pinned cache `entries`."""
        pinned = [entries[(requests[i].task, requests[i].version)] if requests[i].task is not None else None
                  for i in live]
        lora = {e.slot for e in pinned if e is not None and e.manifest.lora is not None}
        plan = plan_batch([e.slot if e is not None else NO_ADAPTER for e in pinned], last=lora)
        heads: list[TaskHead | None] = []
        for seg in plan.segments:
            entry = pinned[plan.order[seg.start]]
            heads.append(entry.head if entry is not None else None)
        return cls([requests[live[j]].row for j in plan.order], [live[j] for j in plan.order], plan, heads)

    def row_heads(self) -> list[TaskHead | None]:
        """The head of each planned row."""
        return [head for seg, head in zip(self.plan.segments, self.heads) for _ in range(seg.stop - seg.start)]


@dataclass
class RowResult:
    prediction: dict[str, Any] | None = None
    error: BaseException | None = None
    logits: torch.Tensor | None = None  # float32 CPU, kept only when asked (tests, evaluation)


def filler_rows(tokens: int, longest: int) -> list[int]:
    """The lengths of the filler rows that hold `tokens` pad tokens, none longer than `longest` (the batch's
    longest row): attention pads every row to the longest, so one long filler row would lengthen them all."""
    if tokens <= 0:
        return []
    return [longest] * (tokens // longest) + ([tokens % longest] if tokens % longest else [])


class Engine:
    """Owns the backbone, the slot pool and the cache; runs mixed-task batches (several forwards may run at once,
    one per batcher worker)."""

    def __init__(
        self,
        backbone: Backbone,
        store: AdapterStore,
        *,
        cache_max_bytes: int = 512 * 1024 * 1024,
        cache_max_slots: int = 64,
        cache_wait_s: float = 30.0,
        host_cache_bytes: int = 256 * 1024 * 1024,
        max_seq_length: int = 256,
        strategy: Strategy | Literal["auto"] = "auto",
        packing: str = "auto",
        upload_max_bytes: int = 64 * 1024 * 1024,
        on_adapter_load: Callable[[CacheEntry, float], None] | None = None,
    ):
        self.backbone = backbone
        self.store = store
        self.upload_max_bytes = upload_max_bytes
        if strategy not in ("auto", "segment", "gather"):
            raise ValueError(f"unknown mixed-task strategy {strategy!r}")
        self.strategy: Strategy | Literal["auto"] = strategy  # auto: chosen per forward
        if packing not in ("auto", "on", "off"):
            raise ValueError(f"unknown packing mode {packing!r}")
        self.packed = packing != "off" and backbone.packable
        if not self.packed:  # what the mode says of packed forwards' attention does not apply (log, /readyz)
            backbone.precision = backbone.precision.padded()
        # Packed bfloat16 forwards on CPU pad their token count to a multiple of 64 (and the adapters' gather
        # layout to buckets): PyTorch's oneDNN bfloat16 matmuls compile a kernel and keep memory for every
        # distinct shape, and token counts would otherwise make new shapes in nearly every batch (measured in
        # docs/benchmarks.md, "Soak"; bench/shape_memory.py). Elsewhere every token is real.
        self.token_bucket = 64 if backbone.device.type == "cpu" and backbone.dtype is torch.bfloat16 else 1
        if packing == "on" and not self.packed:
            log.warning("packed forwards need the BERT layer layout; %s runs padded", backbone.ref.model_type)
        self.encoder = Encoder(backbone.tokenizer, min(max_seq_length, backbone.max_length), backbone.uses_token_type_ids)
        self.host_cache = HostBundleCache(self._fetch_bundle, host_cache_bytes)
        self.pool = install_slot_pool(
            backbone.model, backbone.spec, cache_max_slots, device=backbone.device, dtype=backbone.dtype
        )
        self.cache = AdapterCache(
            self.pool, self.load_bundle, max_bytes=cache_max_bytes, max_slots=cache_max_slots,
            device=backbone.device, dtype=backbone.dtype, on_load=on_adapter_load,
            admission_timeout_s=cache_wait_s,
        )
        self._smoke_ids = itertools.count(1)

    # --- tasks -------------------------------------------------------------------------------------

    def load_bundle(self, task: str, version: int) -> Bundle:
        """`task@version` decoded and validated against the running backbone: from the host cache, or
        fetched from the store (and kept there)."""
        return self.host_cache.get(task, version)

    def _fetch_bundle(self, task: str, version: int) -> Bundle:
        data = self.store.get_bytes(task, version)
        return decode_bundle(data, backbone=self.backbone.ref, max_bytes=self.upload_max_bytes, digest=False)

    def validate_bundle(self, data: bytes) -> Bundle:
        """Full validation of uploaded bytes plus a smoke forward through the serving path."""
        bundle = decode_bundle(data, backbone=self.backbone.ref, max_bytes=self.upload_max_bytes)
        nbytes = self.cache.footprint(bundle.manifest)
        if nbytes > self.cache.max_bytes:
            raise BundleInvalid("over_cache_budget", f"the task needs {nbytes} bytes on the device, more than the "
                                f"whole adapter cache ({self.cache.max_bytes} bytes): it could never be served")
        self.smoke_test(bundle)
        return bundle

    def smoke_test(self, bundle: Bundle) -> None:
        """Serve one short input with the bundle exactly as traffic would be served (slot write, routed
        forward, head, post-processing), before the bundle is stored: a bundle that cannot run, or that
        produces NaN/Inf, is refused while the store and the live tasks are untouched. Uses a negative
        version, which no stored version can ever have, and drops it afterwards."""
        task, version = bundle.manifest.task, -next(self._smoke_ids)
        rows = self.encode(bundle.manifest, *bundle.manifest.kind.smoke_inputs())
        entry = self.cache.acquire(task, version, bundle)
        try:
            (result,) = self.run([RowRequest(task, version, rows[0])], keep_logits=True)
        finally:
            self.cache.release(entry)
            self.cache.invalidate_version(task, version)
        if result.error is not None:
            raise BundleInvalid("smoke_test", f"the bundle failed a test prediction: {result.error}")
        assert result.logits is not None  # kept: keep_logits=True and the row did not fail
        if not bool(torch.isfinite(result.logits).all()):
            raise BundleInvalid("smoke_test", "the bundle produced NaN or Inf on a test input")

    def warm(self, task: str, version: int, bundle: Bundle | None = None) -> None:
        """Load `task@version` into the cache ahead of its first request, if room can be made now (a
        pre-load never waits for in-flight batches to release their slots)."""
        self.cache.release(self.cache.acquire(task, version, bundle, wait_s=0.0))

    def check_cache_budget(self, manifests: Sequence[Manifest]) -> None:
        """Refuse (at start-up) a cache that could not hold one of the stored tasks, or, with none stored, one
        default adapter (Houlsby, m = 64, two labels) on this backbone: such a service could answer nothing."""
        default = Manifest(task="default", head_type="classification", labels=["a", "b"],
                           adapter=AdapterConfig(), backbone=self.backbone.ref)
        need, what = max(((self.cache.footprint(m), f"task '{m.task}'") for m in manifests),
                         default=(self.cache.footprint(default), "one default adapter (Houlsby, m = 64)"))
        if need > self.cache.max_bytes:
            raise ConfigurationError(
                f"the adapter cache budget of {self.cache.max_bytes} bytes (ADAPTER_SERVICE_CACHE_MAX_BYTES) cannot "
                f"hold {what}, which needs {need} bytes on {self.backbone.device} in {self.backbone.dtype}")

    def requests(self, task: str, version: int, manifest: Manifest, rows: Sequence[EncodedRow]) -> list[RowRequest]:
        """One RowRequest per encoded row of `task@version`, with its device footprint for admission."""
        nbytes = self.cache.footprint(manifest)
        return [RowRequest(task, version, r, nbytes) for r in rows]

    # --- encoding ----------------------------------------------------------------------------------

    def encode(self, manifest: Manifest | None, texts: Sequence[str], pairs: Sequence[str] | None = None) -> list[EncodedRow]:
        """Tokenise inputs the way `manifest`'s kind expects them (QA: `texts` are questions, `pairs` contexts)."""
        if manifest is None:
            return self.encoder.encode(texts, pairs)
        kind = manifest.kind
        problem = kind.encode_problem(pairs is not None)
        if problem:
            raise InvalidInput(problem)
        rows = self.encoder.encode(texts, pairs, max_length=manifest.max_length, qa=kind.question_answering)
        if not manifest.token_type_ids:  # trained without segment ids: serve it the same way
            rows = [replace(r, token_type_ids=tuple(0 for _ in r.token_type_ids)) if r.token_type_ids else r
                    for r in rows]
        return rows

    # --- the batch ---------------------------------------------------------------------------------

    def run(self, requests: Sequence[RowRequest], *, keep_logits: bool = False) -> list[RowResult]:
        """Predict every row; one result per row, in order. Errors stay per row."""
        results = [RowResult() for _ in requests]
        entries: Pinned = {}
        failed: dict[RowKey, BaseException] = {}  # tasks whose load failed
        try:
            for req in requests:
                key = (req.task, req.version)
                if req.task is not None and key not in entries and key not in failed:
                    try:
                        entries[key] = self.cache.acquire(req.task, req.version)
                    except Exception as exc:  # fails this task's rows only
                        if not isinstance(exc, ServiceError):
                            log.exception("loading %s@%d failed", req.task, req.version)
                        failed[key] = exc
            live: list[int] = []
            for i, req in enumerate(requests):
                error = failed.get((req.task, req.version)) if req.task is not None else None
                if error is not None:
                    results[i].error = error
                else:
                    live.append(i)
            if live:
                batch = PlannedBatch.of(requests, live, entries)
                with torch.inference_mode():
                    for i, head, out in zip(batch.positions, batch.row_heads(), self._forward(batch)):
                        self._finish(requests[i], head, out, results[i], keep_logits)
        finally:
            for entry in entries.values():
                self.cache.release(entry)
        return results

    def compute_info(self) -> dict[str, str]:
        """How this engine computes (for /readyz, the log and the `adapter_service_compute` metric)."""
        p = self.backbone.precision
        return {"device": str(self.backbone.device), "precision": p.mode, "precision_reason": p.reason,
                "forward": "packed" if self.packed else "padded"}

    def resolved_strategy(self) -> Strategy:
        """The strategy the next forward uses (`auto` follows the device and this thread's torch threads)."""
        if self.strategy == "auto":
            return default_strategy(self.backbone.device, dtype=self.backbone.dtype)
        return self.strategy

    def _forward(self, batch: PlannedBatch) -> list[torch.Tensor]:
        """One routed backbone forward over the planned rows and each segment through its head: the outputs
        (logits, or the pooled hidden state where the head is None) of each planned row, in plan order. The
        caller runs it under `torch.inference_mode()`."""
        plan = batch.plan
        pool_rows, token_rows = (self._packed_hidden if self.packed else self._padded_hidden)(plan, batch.rows)
        pooled: dict[str, torch.Tensor] = {}  # pooling -> [B, d], computed once for all sequence heads
        outs: list[torch.Tensor] = []
        for seg, head in zip(plan.segments, batch.heads):
            if head is None or isinstance(head, SequenceHead):
                kind = "mean" if head is None else head.config.pooling
                if kind not in pooled:
                    pooled[kind] = pool_rows(kind)
                x = pooled[kind][seg.start : seg.stop]
                outs.extend((x if head is None else head.from_pooled(x)).float().cpu())
            else:
                outs.extend(token_rows(head, seg))
        return outs

    def _padded_hidden(self, plan: BatchPlan, rows: list[EncodedRow]) -> tuple[PoolRows, TokenRows]:
        """The routed forward over rows padded to the longest: (pool(kind) -> [B, d], token logits per row)."""
        batch = self.encoder.collate(rows, self.backbone.device)
        mask = batch["attention_mask"]
        routing = self.pool.routing(plan.segments, self.resolved_strategy(), [len(r) for r in rows])
        with self.pool.route(routing):
            hidden = self.backbone.model(**batch).last_hidden_state  # [B, T, d], rows sorted by slot

        def token_rows(head: TaskHead, seg: Segment) -> list[torch.Tensor]:
            return list(head(hidden[seg.start : seg.stop], mask[seg.start : seg.stop]).float().cpu())

        return (lambda kind: pool_tokens(hidden, mask, kind)), token_rows

    def _packed_hidden(self, plan: BatchPlan, rows: list[EncodedRow]) -> tuple[PoolRows, TokenRows]:
        """The routed forward over the rows' real tokens only (`service.modeling.packed`)."""
        device = self.backbone.device
        lengths = [len(r) for r in rows]
        # Round the token count up with pad tokens (no adapter, never read): see token_bucket.
        extra = -sum(lengths) % self.token_bucket
        packing = Packing.of(lengths + filler_rows(extra, max(lengths)), device)
        batch = self.encoder.collate_packed(rows, device, extra_pad_tokens=extra)
        routing = self.pool.routing_packed(plan.segments, packing.offsets, self.resolved_strategy(), packing.tokens,
                                           bucket_shapes=self.token_bucket > 1)
        with self.pool.route(routing):
            hidden = packed_forward(self.backbone.model, self.backbone.spec, batch["input_ids"],
                                    batch.get("token_type_ids"), packing,
                                    self.backbone.precision.attention_dtype)  # [N, d], rows sorted by slot

        def token_rows(head: TaskHead, seg: Segment) -> list[torch.Tensor]:
            a, b = packing.offsets[seg.start], packing.offsets[seg.stop]
            logits = head(hidden[a:b], None).float().cpu()  # [tokens of the segment, C]
            return list(logits.split(packing.lengths[seg.start : seg.stop]))

        return (lambda kind: packing.pool(hidden, kind)), token_rows

    @staticmethod
    def _finish(req: RowRequest, head: TaskHead | None, out: torch.Tensor, result: RowResult, keep_logits: bool,
                ) -> None:
        if out.dim() == 2:  # token-level logits [T, C]: keep the row's own tokens, drop the batch padding
            out = out[: len(req.row)]
        try:
            if head is None:
                pred: dict[str, Any] = {"embedding": F.normalize(out, dim=-1).tolist()}
            else:
                pred = head.postprocess(out, req.row)
            if req.row.truncated:
                pred["truncated"] = True
            result.prediction = pred
            if keep_logits:
                result.logits = out
        except Exception as exc:  # a post-processing bug fails this row only
            log.exception("post-processing failed for task %s", req.task)
            result.error = exc

    # --- convenience -------------------------------------------------------------------------------

    def predict(
        self, task: str, texts: Sequence[str], pairs: Sequence[str] | None = None, *, version: int | None = None,
    ) -> tuple[int, list[dict[str, Any]]]:
        """Blocking one-task prediction (tests, scripts, evaluation). Raises the first row error."""
        version = self.store.get_active(task) if version is None else version
        manifest = self.store.get_info(task, version).manifest
        rows = self.encode(manifest, texts, pairs)
        results = self.run(self.requests(task, version, manifest, rows))
        predictions: list[dict[str, Any]] = []
        for r in results:
            if r.error is not None:
                raise r.error
            assert r.prediction is not None  # every row that did not fail has its prediction
            predictions.append(r.prediction)
        return version, predictions
