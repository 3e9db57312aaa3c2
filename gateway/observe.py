"""One request's span and metrics, opened when it arrives and closed when its answer ends."""

from __future__ import annotations

import time
from contextlib import AbstractContextManager
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from gateway.telemetry import Telemetry

__all__ = ["Observation"]


class Observation:
    """Times a request and records it, once, as a span and a set of metric points."""

    def __init__(
        self, telemetry: Telemetry, operation: str, model: str, request_id: str, **attrs: Any
    ) -> None:
        self.telemetry = telemetry
        self.operation = operation
        self.model = model
        self.started = time.perf_counter()
        self.first_token_at: float | None = None
        self._closed = False
        self.span: Span = telemetry.tracer.start_span(
            f"{operation} {model}",
            kind=SpanKind.SERVER,
            attributes={
                "gen_ai.operation.name": operation,
                "gen_ai.request.model": model,
                "tollgate.request_id": request_id,
                **{k: v for k, v in attrs.items() if v is not None},
            },
        )

    def set(self, **attrs: Any) -> None:
        """Add attributes to the span (``None`` values are left out)."""
        if self.span.is_recording():
            for key, value in attrs.items():
                if value is not None:
                    self.span.set_attribute(key, value)

    def engine_span(self, name: str) -> AbstractContextManager[Span]:
        """A child span around the engine call."""
        context = trace.set_span_in_context(self.span)
        return self.telemetry.tracer.start_as_current_span(name, context=context)

    def first_token(self) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()

    def finish(
        self,
        *,
        input_tokens: int = 0,
        output_tokens: int = 0,
        cached_tokens: int = 0,
        finish_reasons: list[str] | None = None,
        error: str | None = None,
        outcome: str = "ok",
    ) -> None:
        if self._closed:
            return
        self._closed = True
        now = time.perf_counter()
        t = self.telemetry
        attrs: dict[str, Any] = {
            "gen_ai.operation.name": self.operation,
            "gen_ai.request.model": self.model,
        }
        if error is not None:
            attrs["error.type"] = error
            outcome = "error"
        t.request_duration.record(now - self.started, attrs)
        t.requests.add(1, {**attrs, "tollgate.outcome": outcome})
        if error is not None:
            t.errors.add(1, attrs)
        if self.first_token_at is not None:
            t.time_to_first_token.record(self.first_token_at - self.started, attrs)
            if output_tokens > 1:
                t.time_per_output_token.record(
                    (now - self.first_token_at) / (output_tokens - 1), attrs
                )
        if input_tokens:
            t.token_usage.record(input_tokens, {**attrs, "gen_ai.token.type": "input"})
        if output_tokens:
            t.token_usage.record(output_tokens, {**attrs, "gen_ai.token.type": "output"})
        span = self.span
        if span.is_recording():
            span.set_attribute("gen_ai.usage.input_tokens", input_tokens)
            span.set_attribute("gen_ai.usage.output_tokens", output_tokens)
            span.set_attribute("tollgate.cached_tokens", cached_tokens)
            span.set_attribute("tollgate.outcome", outcome)
            if finish_reasons:
                span.set_attribute("gen_ai.response.finish_reasons", finish_reasons)
            if error is not None:
                span.set_attribute("error.type", error)
                span.set_status(Status(StatusCode.ERROR, error))
        span.end()
