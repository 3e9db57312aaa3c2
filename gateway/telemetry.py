"""OpenTelemetry set up from the standard ``OTEL_*`` variables, and the gateway's instruments.

Traces and metrics are exported over OTLP when ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or the
per-signal ``..._TRACES_ENDPOINT`` / ``..._METRICS_ENDPOINT``) is set, to the console when
``OTEL_TRACES_EXPORTER`` / ``OTEL_METRICS_EXPORTER`` say ``console``, and are otherwise off.
Names follow the OpenTelemetry GenAI semantic conventions.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping

from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.trace import Tracer

from serving.tracing import exporter_kind, grpc, tracer_provider_from_env

__all__ = ["Telemetry", "setup_telemetry"]

_DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48)
_TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576)


class Telemetry:
    """The tracer, the meter and the instruments the gateway records into."""

    def __init__(
        self,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
    ) -> None:
        self._tracer_provider = tracer_provider
        self._meter_provider = meter_provider
        tp = tracer_provider or trace.NoOpTracerProvider()
        mp = meter_provider or metrics.NoOpMeterProvider()
        self.tracer: Tracer = tp.get_tracer("tollgate.gateway")
        meter: Meter = mp.get_meter("tollgate.gateway")
        self.request_duration = meter.create_histogram(
            "gen_ai.server.request.duration",
            unit="s",
            description="Time from request received to the last byte of the answer.",
            explicit_bucket_boundaries_advisory=_DURATION_BUCKETS,
        )
        self.time_to_first_token = meter.create_histogram(
            "gen_ai.server.time_to_first_token",
            unit="s",
            description="Time from request received to the first output token.",
            explicit_bucket_boundaries_advisory=_DURATION_BUCKETS,
        )
        self.time_per_output_token = meter.create_histogram(
            "gen_ai.server.time_per_output_token",
            unit="s",
            description="Decode time per output token after the first.",
            explicit_bucket_boundaries_advisory=(
                0.001,
                0.0025,
                0.005,
                0.01,
                0.025,
                0.05,
                0.1,
                0.25,
                0.5,
                1.0,
            ),
        )
        self.token_usage = meter.create_histogram(
            "gen_ai.client.token.usage",
            unit="{token}",
            description="Input and output tokens per request.",
            explicit_bucket_boundaries_advisory=_TOKEN_BUCKETS,
        )
        self.requests = meter.create_counter(
            "tollgate.requests", unit="{request}", description="Requests answered, by outcome."
        )
        self.errors = meter.create_counter(
            "tollgate.errors", unit="{request}", description="Requests that ended in an error."
        )
        self.admissions = meter.create_counter(
            "tollgate.quota.admissions",
            unit="{request}",
            description="Quota admissions by outcome (admitted, rate_limited, insufficient_quota, "
            "store_down_open, store_down_closed).",
        )
        self.quota_store_errors = meter.create_counter(
            "tollgate.quota.store_errors",
            unit="{call}",
            description="Quota store calls that failed or timed out, by operation.",
        )
        self.pending_settlements = meter.create_up_down_counter(
            "tollgate.quota.pending_settlements",
            unit="{reservation}",
            description="Settlements waiting for the quota store to come back.",
        )
        self._meter = meter

    def observe_engines(self, restarts: Callable[[], Mapping[str, int]]) -> None:
        """Report engine restarts (``tollgate.engine.restarts``) from ``restarts()``."""

        def observe(_: CallbackOptions) -> Iterable[Observation]:
            return [
                Observation(count, {"gen_ai.request.model": model})
                for model, count in restarts().items()
            ]

        self._meter.create_observable_counter(
            "tollgate.engine.restarts",
            callbacks=[observe],
            unit="{restart}",
            description="Engines restarted after their process died, by model.",
        )

    @property
    def enabled(self) -> bool:
        return self._tracer_provider is not None or self._meter_provider is not None

    def shutdown(self) -> None:
        """Flush and stop the exporters."""
        for provider in (self._tracer_provider, self._meter_provider):
            shutdown = getattr(provider, "shutdown", None)
            if shutdown is not None:
                shutdown()


def setup_telemetry(env: Mapping[str, str] | None = None) -> Telemetry:
    """Build providers as the ``OTEL_*`` environment asks; none at all when it asks for nothing.

    The providers are not made global, so several apps in one process stay apart.
    """
    env = os.environ if env is None else env
    traces, metrics_kind = exporter_kind("traces", env), exporter_kind("metrics", env)
    if traces == "none" and metrics_kind == "none":
        return Telemetry()
    from opentelemetry.sdk.resources import Resource

    resource = Resource.create({"service.name": env.get("OTEL_SERVICE_NAME", "tollgate")})
    tracer_provider = tracer_provider_from_env(env)
    meter_provider = None
    if metrics_kind != "none":
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import (
            ConsoleMetricExporter,
            MetricExporter,
            PeriodicExportingMetricReader,
        )

        metric_exporter: MetricExporter
        if metrics_kind == "console":
            metric_exporter = ConsoleMetricExporter()
        elif grpc("metrics", env):
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

            metric_exporter = OTLPMetricExporter()
        else:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
                OTLPMetricExporter as HttpMetricExporter,
            )

            metric_exporter = HttpMetricExporter()
        meter_provider = MeterProvider(
            resource=resource, metric_readers=[PeriodicExportingMetricReader(metric_exporter)]
        )
    return Telemetry(tracer_provider, meter_provider)
