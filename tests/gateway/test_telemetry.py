"""Spans and metrics reach an OTLP collector, named as the GenAI conventions name them."""

from __future__ import annotations

import time

import openai
import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from tests.conftest import Collector


def _value(v: AnyValue) -> object:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


def _spans(collector: Collector) -> list[tuple[str, str, str, dict[str, object]]]:
    spans = []
    for body in collector.bodies("traces"):
        request = ExportTraceServiceRequest.FromString(body)
        for resource in request.resource_spans:
            for scope in resource.scope_spans:
                for span in scope.spans:
                    attrs = {a.key: _value(a.value) for a in span.attributes}
                    spans.append((span.name, span.span_id.hex(), span.parent_span_id.hex(), attrs))
    return spans


def _metric_names(collector: Collector) -> set[str]:
    names = set()
    for body in collector.bodies("metrics"):
        request = ExportMetricsServiceRequest.FromString(body)
        for resource in request.resource_metrics:
            for scope in resource.scope_metrics:
                names.update(m.name for m in scope.metrics)
    return names


def test_requests_become_spans_with_engine_children(
    client: openai.OpenAI, otlp_collector: Collector
) -> None:
    client.chat.completions.create(
        model="demo-chat",
        messages=[{"role": "user", "content": "trace me"}],
        max_tokens=4,
        extra_body={"ignore_eos": True},
    )
    client.embeddings.create(model="minilm", input="trace me too")
    deadline = time.monotonic() + 15
    while True:
        spans = _spans(otlp_collector)
        chat = [
            s
            for s in spans
            if s[0] == "chat demo-chat" and s[3].get("gen_ai.usage.output_tokens") == 4
        ]
        embed = [s for s in spans if s[0] == "embeddings minilm"]
        if chat and embed:
            break
        assert time.monotonic() < deadline, f"spans not exported: {[s[0] for s in spans]}"
        time.sleep(0.2)
    _, span_id, _, attrs = chat[-1]
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.request.model"] == "demo-chat"
    assert int(attrs["gen_ai.usage.input_tokens"]) > 0  # type: ignore[call-overload]
    assert attrs["gen_ai.request.max_tokens"] == 4
    children = [s for s in spans if s[2] == span_id]
    assert [c[0] for c in children] == ["engine.generate"]


def test_metrics_are_exported(client: openai.OpenAI, otlp_collector: Collector) -> None:
    client.chat.completions.create(
        model="demo-chat", messages=[{"role": "user", "content": "count me"}], max_tokens=3
    )
    expected = {
        "gen_ai.server.request.duration",
        "gen_ai.server.time_to_first_token",
        "gen_ai.server.time_per_output_token",
        "gen_ai.client.token.usage",
        "tollgate.requests",
    }
    deadline = time.monotonic() + 15
    while not expected <= _metric_names(otlp_collector):
        assert time.monotonic() < deadline, f"missing {expected - _metric_names(otlp_collector)}"
        time.sleep(0.3)


def test_errors_are_counted(client: openai.OpenAI, otlp_collector: Collector) -> None:
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model="demo-chat",
            messages=[{"role": "user", "content": "x"}],
            max_tokens=100_000,
        )
    client.chat.completions.create(
        model="demo-chat",
        messages=[{"role": "user", "content": "x"}],
        stream=True,
        max_tokens=2,
    ).close()
    deadline = time.monotonic() + 15
    while "tollgate.errors" not in _metric_names(otlp_collector):
        assert time.monotonic() < deadline, "tollgate.errors never exported"
        time.sleep(0.3)
