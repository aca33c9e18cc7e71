"""Prometheus metrics of one engine (and the HTTP app around it), in their own registry."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 128, 256)
LOAD_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class ServeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "adapterkit_requests", "HTTP requests by route, adapter and status", ["route", "adapter", "status"], registry=r
        )
        self.errors = Counter(
            "adapterkit_errors", "Failed HTTP requests by route, adapter and error code", ["route", "adapter", "code"],
            registry=r,
        )
        self.latency = Histogram(
            "adapterkit_request_latency_seconds", "Request latency by route", ["route"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_rows = Histogram(
            "adapterkit_batch_size", "Rows per batched forward (encode) or generation batch", ["kind"],
            buckets=BATCH_BUCKETS, registry=r,
        )
        self.batch_seconds = Histogram(
            "adapterkit_batch_seconds", "Time of one batched forward (or generation batch)", ["kind"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.isolated_batches = Counter(
            "adapterkit_isolated_batches", "Failed batches re-run one request at a time, so a bad row fails alone",
            registry=r,
        )
        self.hot_load = Histogram(
            "adapterkit_adapter_load_seconds", "Time to load an adapter from the store until it serves",
            buckets=LOAD_BUCKETS, registry=r,
        )

    def watch(self, stats: Callable[[], dict[str, int]]) -> None:
        """Read queue and cache figures from `stats()` at every scrape."""
        self.registry.register(_StatsCollector(stats))


class _StatsCollector(Collector):
    def __init__(self, stats: Callable[[], dict[str, int]]) -> None:
        self.stats = stats

    def collect(self) -> Iterator:
        s = self.stats()
        yield GaugeMetricFamily("adapterkit_queue_depth", "Rows waiting to run (queued or waiting for a load)",
                                value=s["queued_rows"])
        yield CounterMetricFamily("adapterkit_cache_hits", "Requests whose adapter was resident", value=s["hits"])
        yield CounterMetricFamily("adapterkit_cache_misses", "Requests that had to load their adapter",
                                  value=s["misses"])
        yield CounterMetricFamily("adapterkit_cache_evictions", "Adapters evicted from memory", value=s["evictions"])
        yield GaugeMetricFamily("adapterkit_loaded_adapters", "Adapter versions resident in memory", value=s["loaded"])
        yield GaugeMetricFamily("adapterkit_loaded_adapter_bytes", "Bytes of resident adapters", value=s["bytes"])
        yield GaugeMetricFamily("adapterkit_cache_budget_bytes", "Byte budget of resident adapters", value=s["budget"])
        yield CounterMetricFamily("adapterkit_merges", "Adapters served merged into the base", value=s.get("merges", 0))
        yield GaugeMetricFamily("adapterkit_merges_refused",
                                "Adapters whose merge failed its check (never merged)", value=s.get("merges_refused", 0))
