"""OpenTelemetry providers from the standard ``OTEL_*`` variables, for every Tollgate process.

Signals are exported over OTLP when ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or the per-signal
``..._TRACES_ENDPOINT`` / ``..._METRICS_ENDPOINT``) is set, to the console when
``OTEL_TRACES_EXPORTER`` / ``OTEL_METRICS_EXPORTER`` say ``console``, and are otherwise off.
Calls between processes carry W3C trace context (``traceparent``), so that one trace covers
a request in the gateway and in the worker that served it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

__all__ = ["exporter_kind", "grpc", "tracer_provider_from_env"]


def exporter_kind(signal: str, env: Mapping[str, str]) -> str:
    """``otlp``, ``console`` or ``none`` for ``traces`` or ``metrics``."""
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return "none"
    chosen = env.get(f"OTEL_{signal.upper()}_EXPORTER", "").strip().lower()
    if chosen in ("none", "console"):
        return chosen
    if (
        chosen == "otlp"
        or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or env.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT")
    ):
        return "otlp"
    return "none"


def grpc(signal: str, env: Mapping[str, str]) -> bool:
    protocol = env.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_PROTOCOL") or env.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
    )
    return protocol.strip().lower() == "grpc"


def tracer_provider_from_env(
    env: Mapping[str, str] | None = None, *, service_name: str = "tollgate"
) -> TracerProvider | None:
    """A tracer provider exporting as the environment asks (``None``: traces are off).

    Not made global, so that several apps in one process stay apart.
    """
    env = os.environ if env is None else env
    kind = exporter_kind("traces", env)
    if kind == "none":
        return None
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SpanExporter,
    )

    exporter: SpanExporter
    if kind == "console":
        exporter = ConsoleSpanExporter()
    elif grpc("traces", env):
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpSpanExporter,
        )

        exporter = HttpSpanExporter()
    resource = Resource.create({"service.name": env.get("OTEL_SERVICE_NAME", service_name)})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider
