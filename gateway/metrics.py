"""``GET /metrics``: Prometheus text format, for the operator (the admin token).

Everything is read at scrape time from the objects that keep it (prometheus-client's custom
collector), so the request path pays nothing for metrics. Labels carry models, cache
statuses and priority classes, never a tenant, a key or a prompt: the queue's groups are
tenants, so per-group depth is reported as how many groups wait, not which.

The engine figures are vLLM's own scheduler stats (running and waiting requests, KV cache
usage, prefix-cache queries and hits) as the gateway's stat logger receives them, plus the
engine time the metering scheduler counts (`serving.metering`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from gateway.cache import CacheStatus, ResponseCache
from serving import EngineHost, GenerationEngine
from serving.fairqueue import CLASSES, WAIT_BUCKETS_S, FairQueue

__all__ = ["CONTENT_TYPE", "GatewayCollector", "registry_for", "render"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class GatewayCollector(Collector):
    """The gateway's figures, collected at scrape time."""

    def __init__(self, host: EngineHost, cache: ResponseCache) -> None:
        self.host = host
        self.cache = cache
        self._last: dict[str, tuple[float, float]] = {}

    def collect(self) -> Iterator[Metric]:
        yield from self._cache()
        yield from self._engines()
        yield from self._pool()

    def _pool(self) -> Iterator[Metric]:
        pool = self.host.pool
        state = GaugeMetricFamily(
            "tollgate_model_state",
            "1 for each model's state on the device (cold, starting, ready, sleeping, ...).",
            labels=["model", "state"],
        )
        memory = GaugeMetricFamily(
            "tollgate_model_memory_bytes",
            "Each model's footprint on the device (measured once it started).",
            labels=["model"],
        )
        starts = CounterMetricFamily(
            "tollgate_model_cold_starts",
            "Times a model was brought in on demand.",
            labels=["model"],
        )
        start_time = CounterMetricFamily(
            "tollgate_model_cold_start_seconds",
            "Time spent bringing models in on demand.",
            labels=["model"],
        )
        evictions = CounterMetricFamily(
            "tollgate_model_evictions",
            "Times a model was taken out to make room.",
            labels=["model"],
        )
        idle = CounterMetricFamily(
            "tollgate_model_idle_stops",
            "Times a model left the device for being idle.",
            labels=["model"],
        )
        for row in pool.status():
            state.add_metric([row.name, row.state.value], 1)
            memory.add_metric([row.name], row.memory_gb * (1 << 30))
            starts.add_metric([row.name], row.cold_starts)
            start_time.add_metric([row.name], row.cold_start_ms_total / 1000)
            evictions.add_metric([row.name], row.evictions)
            idle.add_metric([row.name], row.idle_stops)
        yield from (state, memory, starts, start_time, evictions, idle)
        yield GaugeMetricFamily(
            "tollgate_device_memory_budget_bytes",
            "The device's memory for models.",
            value=pool.budget_gb * (1 << 30),
        )
        yield GaugeMetricFamily(
            "tollgate_device_memory_used_bytes",
            "The footprints of the models resident on the device.",
            value=pool.used_gb() * (1 << 30),
        )

    def _cache(self) -> Iterator[Metric]:
        answers = CounterMetricFamily(
            "tollgate_cache_answers",
            "Deterministic answers by how the response cache served them.",
            labels=["model", "status"],
        )
        for (model, status), count in sorted(self.cache.counts.items()):
            answers.add_metric([model, status.value], count)
        yield answers
        followers = CounterMetricFamily(
            "tollgate_single_flight_followers",
            "Answers that followed an identical request's generation in progress.",
            labels=["model"],
        )
        for (model, status), count in sorted(self.cache.counts.items()):
            if status is CacheStatus.SHARED:
                followers.add_metric([model], count)
        yield followers
        yield GaugeMetricFamily(
            "tollgate_single_flight_in_progress",
            "Generations that identical requests may follow right now.",
            value=len(self.cache.flights),
        )

    def _engines(self) -> Iterator[Metric]:
        families: dict[str, Any] = {
            "running": GaugeMetricFamily(
                "tollgate_engine_running", "Requests in vLLM's running batch.", labels=["model"]
            ),
            "waiting": GaugeMetricFamily(
                "tollgate_engine_waiting", "Requests in vLLM's own queue.", labels=["model"]
            ),
            "kv": GaugeMetricFamily(
                "tollgate_engine_kv_cache_usage", "Share of the KV cache in use.", labels=["model"]
            ),
            "queries": CounterMetricFamily(
                "tollgate_prefix_cache_queries_tokens",
                "Prompt tokens looked up in the prefix cache.",
                labels=["model"],
            ),
            "hits": CounterMetricFamily(
                "tollgate_prefix_cache_hits_tokens",
                "Prompt tokens served from the prefix cache.",
                labels=["model"],
            ),
            "ratio": GaugeMetricFamily(
                "tollgate_prefix_cache_hit_ratio",
                "Prefix-cache hits over queries since the engine started.",
                labels=["model"],
            ),
            "busy": CounterMetricFamily(
                "tollgate_engine_busy_seconds",
                "Time the engine spent in steps (since it last started).",
                labels=["model"],
            ),
            "busy_ratio": GaugeMetricFamily(
                "tollgate_engine_busy_ratio",
                "Share of the time since the previous scrape the engine spent in steps.",
                labels=["model"],
            ),
            "gpu": CounterMetricFamily(
                "tollgate_gpu_seconds",
                "Engine time billed to requests (gpu_ms), in seconds.",
                labels=["model"],
            ),
            "restarts": CounterMetricFamily(
                "tollgate_engine_restarts", "Engine restarts after a crash.", labels=["model"]
            ),
            "depth": GaugeMetricFamily(
                "tollgate_queue_depth",
                "Requests waiting in the admission queue.",
                labels=["model", "priority"],
            ),
            "groups": GaugeMetricFamily(
                "tollgate_queue_groups_waiting",
                "Fairness groups with requests waiting.",
                labels=["model"],
            ),
            "slots": GaugeMetricFamily(
                "tollgate_queue_slots", "Requests the engine runs at once.", labels=["model"]
            ),
        }
        waits = HistogramMetricFamily(
            "tollgate_queue_wait_seconds",
            "Time requests waited in the admission queue.",
            labels=["model", "priority"],
        )
        now = time.monotonic()
        for engine in self.host.engines():
            stats = engine.stats()
            model = [engine.name]
            families["running"].add_metric(model, stats.running)
            families["waiting"].add_metric(model, stats.waiting)
            families["kv"].add_metric(model, stats.kv_cache_usage)
            families["queries"].add_metric(model, stats.prefix_cache_queries)
            families["hits"].add_metric(model, stats.prefix_cache_hits)
            if stats.prefix_cache_queries:
                ratio = stats.prefix_cache_hits / stats.prefix_cache_queries
                families["ratio"].add_metric(model, ratio)
            families["busy"].add_metric(model, stats.busy_ms / 1000)
            families["gpu"].add_metric(model, stats.engine_ms_total / 1000)
            families["restarts"].add_metric(model, stats.restarts)
            last = self._last.get(engine.name)
            if last is not None and now > last[0] and stats.busy_ms >= last[1]:
                busy = (stats.busy_ms - last[1]) / 1000 / (now - last[0])
                families["busy_ratio"].add_metric(model, min(busy, 1.0))
            self._last[engine.name] = (now, stats.busy_ms)
            queue = getattr(engine, "queue", None)
            if not isinstance(engine, GenerationEngine) or not isinstance(queue, FairQueue):
                continue
            families["slots"].add_metric(model, queue.slots)
            families["groups"].add_metric(model, len(queue.depth()))
            by_class = queue.waiting_by_class()
            for priority in CLASSES:
                families["depth"].add_metric([engine.name, priority], by_class[priority])
                count, total, *buckets = queue.waits[priority]
                cumulative = [
                    (str(bound), buckets[i]) for i, bound in enumerate(WAIT_BUCKETS_S)
                ] + [("+Inf", count)]
                waits.add_metric([engine.name, priority], cumulative, total)
        yield from families.values()
        yield waits


def registry_for(host: EngineHost, cache: ResponseCache) -> CollectorRegistry:
    """A registry of its own (not the process-wide default) with the gateway's collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GatewayCollector(host, cache))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
