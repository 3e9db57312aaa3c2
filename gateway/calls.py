"""One model call, from the moment its model is known to its one settlement and one event.

Every call to a model (chat, completions, embeddings) is a `Call`, made by its route as soon
as it knows the model and kept in the request's scope. The call owns what must happen exactly
once however the request ends: the quota settlement, the usage event, the span and the
metrics. It ends in one of four outcomes::

    ok        answered in full           billed what the engine did
    aborted   the client went away       billed what the engine did until then
    error     it failed on our side      billed what the client received (a stream cut
                                         short), nothing otherwise
    rejected  refused before any work    (a quota, an engine that is not there) billed nothing

Whatever path a request takes, `close` runs once: the answer's own code closes the call when
it ends (`Call.commit` for an answer, `Call.close` otherwise); the error handlers close it
for errors raised by a route; and `CallGuard`, a middleware around every route, closes a
call that is still open when the request's task is done with it (the client went away
before the answer started, the task was cancelled at shutdown) as aborted. Closing never
blocks and never raises: the settlement and the event's write run as tasks of their own
(admission's and the recorder's), which cancelling the request cannot cancel.

The quota settles to the event: the same tokens, and spend equal to the event's exact cost
(cached prompt tokens at the cached price), so the spend counter agrees with the invoice.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from decimal import Decimal
from typing import Any

import msgspec
from litestar.types import ASGIApp, Receive, Scope, Send

from billing.events import EventStatus, UsageEvent
from gateway.admission import Ticket, unmetered
from gateway.auth import Principal
from gateway.cache.responses import CacheStatus
from gateway.observe import Observation
from gateway.telemetry import Telemetry
from gateway.usage import UsageRecorder

__all__ = ["Call", "CallGuard", "Outcome", "Usage", "call_of"]

logger = logging.getLogger(__name__)


class Usage(msgspec.Struct):
    """Token counts of one call."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    #: The engine's time for this call, in milliseconds (its share of the engine's steps).
    gpu_ms: float = 0.0
    #: The device kind that served it and its cost per hour (USD, a decimal string), as
    #: the engine's chunks name them (``None``: this process's own engines).
    device: str | None = None
    device_hour_usd: str | None = None


class Outcome(enum.StrEnum):
    """How a call ended; the usage event's status."""

    OK = "ok"
    ABORTED = "aborted"
    ERROR = "error"
    REJECTED = "rejected"


_STATUS = {
    Outcome.OK: EventStatus.OK,
    Outcome.ABORTED: EventStatus.ABORTED,
    Outcome.ERROR: EventStatus.ERROR,
    Outcome.REJECTED: EventStatus.REJECTED,
}


class Call:
    """One model call: its quota ticket, what the engine did, its span and its event.

    Args:
        request_id: The request's id (the event's id).
        operation: ``chat``, ``text_completion`` or ``embeddings``.
        model: The model's canonical name.
        telemetry: Where the span and the metrics go.
        recorder: Writes the usage event; ``None`` when nobody is billed (auth off).
        principal: The tenant's key that pays; ``None`` when nobody is billed.
    """

    __slots__ = (
        "_recorder",
        "cache_status",
        "closed",
        "delivered",
        "event",
        "finish_reasons",
        "model",
        "obs",
        "operation",
        "outcome",
        "principal",
        "request_id",
        "started",
        "ticket",
        "usage",
    )

    def __init__(
        self,
        *,
        request_id: str,
        operation: str,
        model: str,
        telemetry: Telemetry,
        recorder: UsageRecorder | None,
        principal: Principal | None,
    ) -> None:
        self.request_id = request_id
        self.operation = operation
        self.model = model
        self.principal = principal if principal is not None and principal.tenant_id else None
        self._recorder = recorder if self.principal is not None else None
        self.obs = Observation(telemetry, operation, model, request_id)
        self.started = time.perf_counter()
        self.ticket: Ticket = unmetered(request_id, model)
        #: What the engine did so far (prompt tokens count once the engine worked on them).
        self.usage = Usage()
        #: Whether output reached the client (a stream under way).
        self.delivered = False
        self.finish_reasons: list[str] = []
        self.closed = False
        #: How the answer relates to the response cache (``None``: not deterministic).
        self.cache_status: CacheStatus | None = None
        self.outcome: Outcome | None = None
        self.event: UsageEvent | None = None

    @property
    def billed(self) -> bool:
        """Whether this call has a usage event (a tenant's key made it)."""
        return self._recorder is not None

    def admitted(self, ticket: Ticket) -> None:
        """The quota reservation this call settles."""
        self.ticket = ticket

    def _tokens(self, outcome: Outcome) -> Usage:
        if outcome is Outcome.REJECTED or (outcome is Outcome.ERROR and not self.delivered):
            return Usage()
        return self.usage

    def close(self, outcome: Outcome, error: str | None = None) -> UsageEvent | None:
        """End the call (the first time only): settle, record the span, write the event.

        The event is written in the background. Never blocks, never raises.

        Returns:
            The event (``None`` when nobody is billed, or the call was closed before).
        """
        event = self._end(outcome, error)
        if event is not None and self._recorder is not None:
            self._recorder.record_later(event)
        return event

    def _end(
        self, outcome: Outcome, error: str | None, *, settle: bool = True
    ) -> UsageEvent | None:
        if self.closed:
            return None
        self.closed = True
        self.outcome = outcome
        try:
            return self._close(outcome, error, settle)
        except Exception:  # a bug here must not leave the rest of the request undone
            logger.exception("closing call %s failed", self.request_id)
            return None

    def _close(self, outcome: Outcome, error: str | None, settle: bool) -> UsageEvent | None:
        tokens = self._tokens(outcome)
        event = None
        if self._recorder is not None and self.principal is not None:
            event = self.event = self._recorder.event(
                self.principal,
                self.request_id,
                model=self.model,
                operation=self.operation,
                status=_STATUS[outcome],
                prompt_tokens=tokens.prompt_tokens,
                cached_tokens=tokens.cached_tokens,
                completion_tokens=tokens.completion_tokens,
                latency_s=time.perf_counter() - self.started,
                ttft_s=None
                if self.obs.first_token_at is None
                else self.obs.first_token_at - self.started,
                from_response_cache=self.cache_status in (CacheStatus.HIT, CacheStatus.SHARED),
                gpu_ms=round(self.usage.gpu_ms, 3),
                device=self.usage.device,
                device_hour_usd=self.usage.device_hour_usd,
            )
        if settle or event is None:
            spend = event.cost_usd if event is not None else Decimal(0)
            self.ticket.settle(tokens.prompt_tokens + tokens.completion_tokens, spend)
        self.obs.finish(
            input_tokens=tokens.prompt_tokens,
            output_tokens=tokens.completion_tokens,
            cached_tokens=tokens.cached_tokens,
            finish_reasons=self.finish_reasons,
            error=error,
            outcome="ok" if outcome is Outcome.OK else str(outcome),
        )
        return event

    async def commit(self) -> UsageEvent | None:
        """End the call as answered, with its event durable before the answer ends.

        If the caller is cancelled meanwhile (the client went away at the last moment), the
        write goes on in the background and the call stays ``ok``.

        Returns:
            The event once written, for the receipt; ``None`` when nobody is billed or it
            could not be written (then the answer must not claim a receipt).
        """
        event = self._end(Outcome.OK, None, settle=False)
        recorder = self._recorder
        if event is None or recorder is None:
            return None
        if self.ticket.metered:  # the settlement travels with the event (one round trip)
            tokens = self.usage.prompt_tokens + self.usage.completion_tokens
            task = recorder.own(self.ticket.settle_with(tokens, event.cost_usd, event))
        else:
            task = recorder.record_later(event)
        written = await asyncio.shield(task)
        return event if written else None

    def fail(self, status_code: int, error: str | None = None) -> None:
        """End the call for an error answer with this HTTP status."""
        outcome = Outcome.REJECTED if status_code in (429, 503) else Outcome.ERROR
        self.close(outcome, error or f"http_{status_code}")


def call_of(scope: Scope | Any) -> Call | None:
    """The call of this request, if its route made one."""
    call = scope.get("state", {}).get("call")
    return call if isinstance(call, Call) else None


class CallGuard:
    """ASGI middleware: a call still open when its request is done with is closed, aborted.

    The answer's own code closes its call when it runs to any end; this covers the paths on
    which it never runs or never gets there: the client left before the answer started, or
    the request's task was cancelled (a server shutting down).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.app(scope, receive, send)
        finally:
            call = call_of(scope)
            if call is not None and not call.closed:
                call.close(Outcome.ABORTED, "ClientGone")
