"""Prometheus metrics (prometheus-client), one registry per app so several apps can live in one process."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from service.runtime.batcher import BatchStats
from service.runtime.cache import CacheStats

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
UNKNOWN_TASK = "_unknown"  # label for tasks that do not exist (keeps label cardinality bounded)


class _CacheCollector(Collector):
    """Reads the cache's counters at scrape time (no bookkeeping on the hot path)."""

    def __init__(self, stats: Callable[[], CacheStats | None]):
        self._stats = stats

    def collect(self) -> Iterable:
        s = self._stats()
        if s is None:
            return []
        return [
            CounterMetricFamily("adapter_service_cache_hits", "Adapter cache hits", value=s.hits),
            CounterMetricFamily("adapter_service_cache_misses", "Adapter cache misses (loads)", value=s.misses),
            CounterMetricFamily("adapter_service_cache_evictions", "Adapters evicted from the device", value=s.evictions),
            CounterMetricFamily("adapter_service_cache_load_failures", "Adapter loads that failed", value=s.load_failures),
            CounterMetricFamily("adapter_service_cache_slot_waits", "Loads that waited for a pinned slot to be released",
                                value=s.slot_waits),
            CounterMetricFamily("adapter_service_cache_slot_wait_seconds", "Seconds loads waited for a slot",
                                value=s.slot_wait_seconds_total),
            CounterMetricFamily("adapter_service_cache_slot_wait_timeouts",
                                "Loads that found no slot within ADAPTER_SERVICE_CACHE_WAIT_S (answered 503)",
                                value=s.slot_wait_timeouts),
            GaugeMetricFamily("adapter_service_cache_resident_bytes", "Adapter + head bytes on the device",
                              value=s.resident_bytes),
            GaugeMetricFamily("adapter_service_cache_resident_adapters", "Tasks resident on the device",
                              value=s.resident_entries),
        ]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("adapter_service_requests", "Predict requests by task and HTTP status",
                                ["task", "status"], registry=r)
        self.latency = Histogram("adapter_service_request_seconds", "Predict latency by task", ["task"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("adapter_service_batch_size", "Rows per backbone forward",
                                    buckets=(1, 2, 4, 8, 16, 24, 32, 48, 64, 128, 256), registry=r)
        self.batch_tokens = Histogram("adapter_service_batch_tokens", "Tokens per backbone forward (real tokens "
                                      "when forwards are packed, rows x longest row when padded)",
                                      buckets=(64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384), registry=r)
        self.batch_tasks = Histogram("adapter_service_batch_tasks", "Distinct tasks per backbone forward",
                                     buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.batch_seconds = Histogram("adapter_service_batch_seconds", "Seconds per backbone forward",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("adapter_service_queue_depth", "Rows waiting for a forward", registry=r)
        self.waiting_for_slot = Gauge("adapter_service_rows_waiting_for_slot",
                                      "Queued rows kept out of a batch because their task did not fit the device "
                                      "cache beside the running batches' tasks", registry=r)
        self.admission_wait = Histogram("adapter_service_admission_wait_seconds",
                                        "Seconds a row waited from first being kept out by the cache budget to "
                                        "its batch", buckets=LATENCY_BUCKETS, registry=r)
        self.batches_cut_short = Counter("adapter_service_batches_cut_short",
                                         "Batches that left rows of other tasks queued because the device cache "
                                         "could not hold their tasks too", registry=r)
        self.load_seconds = Histogram("adapter_service_adapter_load_seconds", "Seconds to load one adapter",
                                      buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0), registry=r)
        self.compute = Info("adapter_service_compute", "How the backbone computes: device, precision (and why), "
                            "packed or padded forwards", registry=r)
        self._cache_stats: Callable[[], CacheStats | None] = lambda: None
        r.register(_CacheCollector(lambda: self._cache_stats()))

    def bind(self, *, cache_stats: Callable[[], CacheStats], queue_depth: Callable[[], int],
             waiting_for_slot: Callable[[], int]) -> None:
        """Attach the live runtime (called once it exists)."""
        self._cache_stats = cache_stats
        self.queue_depth.set_function(queue_depth)
        self.waiting_for_slot.set_function(waiting_for_slot)

    def observe_request(self, task: str, status: int, seconds: float) -> None:
        self.requests.labels(task, str(status)).inc()
        self.latency.labels(task).observe(seconds)

    def observe_batch(self, stats: BatchStats) -> None:
        self.batch_size.observe(stats.rows)
        self.batch_tokens.observe(stats.tokens)
        self.batch_tasks.observe(stats.tasks)
        self.batch_seconds.observe(stats.seconds)
        if stats.cut_short:
            self.batches_cut_short.inc()
        for seconds in stats.admission_waits:
            self.admission_wait.observe(seconds)

    def observe_load(self, entry, seconds: float) -> None:
        self.load_seconds.observe(seconds)
