"""Prometheus figures of the engines and the device's pool, read at scrape time.

Every process that hosts engines (a gateway with its own, a worker) renders these on its
``/metrics``. Labels carry models and priority classes, never a tenant, a key or a prompt:
the admission queue's groups are tenants, so per-group depth is reported as how many groups
wait, not which.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from serving.engine import GenerationEngine
from serving.fairqueue import CLASSES, WAIT_BUCKETS_S, FairQueue
from serving.host import EngineHost
from serving.router import Router

__all__ = ["EngineCollector", "RouterCollector"]


class EngineCollector(Collector):
    """The engines' and the pool's figures of one host."""

    def __init__(self, host: EngineHost) -> None:
        self.host = host
        self._last: dict[str, tuple[float, float]] = {}

    def collect(self) -> Iterator[Metric]:
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


class RouterCollector(Collector):
    """A gateway's routing to workers: where requests went and why, and the fleet it sees."""

    def __init__(self, router: Router) -> None:
        self.router = router

    def collect(self) -> Iterator[Metric]:
        routed = CounterMetricFamily(
            "tollgate_routed_requests",
            "Requests sent to each worker, by why it was chosen (affinity, balance, "
            "round_robin, placement).",
            labels=["worker", "reason"],
        )
        for (worker_id, reason), count in sorted(self.router.routed.items()):
            routed.add_metric([worker_id, reason], count)
        yield routed
        inflight = GaugeMetricFamily(
            "tollgate_route_inflight",
            "Requests this gateway has in flight on each worker.",
            labels=["worker"],
        )
        peak = GaugeMetricFamily(
            "tollgate_route_peak_inflight",
            "The most requests this gateway had in flight on each worker at once.",
            labels=["worker"],
        )
        for worker in self.router.workers:
            inflight.add_metric([worker.id], self.router.inflight.get(worker.id, 0))
            peak.add_metric([worker.id], self.router.peak_inflight.get(worker.id, 0))
        yield inflight
        yield peak
        workers = GaugeMetricFamily(
            "tollgate_workers",
            "Workers in the registry, by device kind and whether they drain.",
            labels=["device", "draining"],
        )
        counts: dict[tuple[str, str], int] = {}
        for worker in self.router.workers:
            key = (worker.device_kind, str(worker.draining).lower())
            counts[key] = counts.get(key, 0) + 1
        for (device, draining), count in sorted(counts.items()):
            workers.add_metric([device, draining], count)
        yield workers
