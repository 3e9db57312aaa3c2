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

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from gateway.cache import CacheStatus, ResponseCache
from serving import EngineHost
from serving.metrics import EngineCollector, RouterCollector
from serving.remote import RemoteHost

__all__ = ["CONTENT_TYPE", "GatewayCollector", "registry_for", "render"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class GatewayCollector(Collector):
    """The gateway's figures, collected at scrape time."""

    def __init__(self, cache: ResponseCache) -> None:
        self.cache = cache

    def collect(self) -> Iterator[Metric]:
        yield from self._cache()

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


def registry_for(host: EngineHost, cache: ResponseCache) -> CollectorRegistry:
    """A registry of its own (not the process-wide default) with the gateway's collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GatewayCollector(cache))
    if isinstance(host, RemoteHost):  # the engines' figures are on the workers' /metrics
        registry.register(RouterCollector(host.router))
    else:
        registry.register(EngineCollector(host))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
