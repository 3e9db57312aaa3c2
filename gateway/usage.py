"""Usage events from the request path: priced, appended to the durable outbox, once each.

A request that ends with an answer has its event in the outbox before the answer's last byte
leaves (so a replica killed right after answering loses nothing); one that ends otherwise
(the client went away, an error) has it appended in the background. The flusher moves events
from the outbox into the ledger off the request path; the ledger ignores a second copy of an
id, so a redelivery after a crash counts once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from billing.events import CacheTier, EventStatus, UsageEvent
from billing.ledger import InvalidEvent, Ledger
from billing.outbox import Outbox
from billing.pricing import Price, PriceBook, rate
from gateway.auth import Principal
from gateway.middleware import request_id_of
from gateway.quotas.watchdog import StoreWatchdog, guarded

__all__ = ["Receipt", "UsageRecorder", "cost_header", "failed_request_event"]

logger = logging.getLogger(__name__)


class UsageRecorder:
    """Prices usage with the current price book and appends the events to the outbox."""

    def __init__(
        self,
        outbox: Outbox,
        ledger: Ledger,
        *,
        fallback: Outbox | None = None,
        watchdog: StoreWatchdog | None = None,
        hard_timeout_s: float = 5.0,
        refresh_s: float = 5.0,
    ) -> None:
        self.outbox = outbox
        self.fallback = fallback
        self.watchdog = watchdog
        self.hard_timeout_s = hard_timeout_s
        self.ledger = ledger
        self._book = PriceBook([])
        self._refresh_s = refresh_s
        self._refreshed = float("-inf")
        self._refresher: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        await self.refresh()
        self._refresher = asyncio.get_running_loop().create_task(self._refresh_loop())

    async def refresh(self) -> None:
        """Reload the price book (after a price change, or every ``refresh_s``)."""
        self._book = await self.ledger.price_book()
        self._refreshed = time.monotonic()

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_s)
            try:
                await self.refresh()
            except Exception:
                logger.exception("could not reload prices; keeping the previous ones")

    def price(self, model: str, when: datetime | None = None) -> Price | None:
        return self._book.price_at(model, when or datetime.now(UTC))

    def reservation_usd(self, model: str, prompt_tokens: int, max_output_tokens: int) -> Decimal:
        """The most a request can cost: its prompt uncached plus every output token."""
        return rate(self.price(model), prompt_tokens, 0, max_output_tokens)

    def event(
        self,
        principal: Principal,
        request_id: str,
        *,
        model: str,
        operation: str,
        status: EventStatus,
        prompt_tokens: int = 0,
        cached_tokens: int = 0,
        completion_tokens: int = 0,
        latency_s: float = 0.0,
        ttft_s: float | None = None,
    ) -> UsageEvent:
        """One request's event, priced at the version in effect now."""
        now = datetime.now(UTC)
        price = self.price(model, now)
        return UsageEvent(
            id=request_id,
            occurred_at=now,
            tenant_id=principal.tenant_id or "",
            key_id=principal.key_id,
            model=model,
            operation=operation,
            prompt_tokens=prompt_tokens,
            cached_tokens=cached_tokens,
            completion_tokens=completion_tokens,
            cache_tier=CacheTier.PREFIX if cached_tokens else CacheTier.NONE,
            status=status,
            latency_ms=round(latency_s * 1000, 3),
            ttft_ms=None if ttft_s is None else round(ttft_s * 1000, 3),
            cost_usd=rate(price, prompt_tokens, cached_tokens, completion_tokens),
            price_id=None if price is None else price.id,
        )

    async def record(self, event: UsageEvent) -> None:
        """Append now; returns once the event is durable.

        When the outbox's store is down or hung (its watchdog says so), the event goes to the
        fallback outbox in the SQL database instead, at once; a copy that reached both is
        counted once by the ledger. If both fail, the event is kept and retried in the
        background rather than failing an answer that is already computed.
        """
        try:
            await self._append(event)
        except InvalidEvent:
            logger.exception("usage event %s refused by the outbox", event.id)
        except Exception:
            logger.warning("outbox append failed for %s; retrying in the background", event.id)
            self.record_later(event)

    async def _append(self, event: UsageEvent) -> None:
        if self.fallback is None:
            await self.outbox.append(event)
            return
        try:
            await guarded(self.outbox.append(event), self.watchdog, self.hard_timeout_s)
        except InvalidEvent:
            raise
        except Exception:
            await self.fallback.append(event)

    def record_later(self, event: UsageEvent) -> None:
        """Append in the background (the request has already ended some other way)."""
        task = asyncio.get_running_loop().create_task(self._append_retrying(event))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _append_retrying(self, event: UsageEvent, attempts: int = 20) -> None:
        delay = 0.1
        for _ in range(attempts):
            try:
                await self._append(event)
                return
            except InvalidEvent:
                logger.exception("usage event %s refused by the outbox", event.id)
                return
            except Exception:  # the outbox is down: retry, then give up loudly
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        logger.error("usage event %s could not be written to the outbox", event.id)

    async def close(self, grace_s: float = 5.0) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            await asyncio.gather(self._refresher, return_exceptions=True)
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=grace_s)


_OPERATIONS = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "text_completion",
    "/v1/embeddings": "embeddings",
}


def failed_request_event(recorder: UsageRecorder, scope: Any, status_code: int) -> None:
    """A tenant's model call that ended in an error before it had an event: record one.

    Refusals (429, 503) count as ``rejected``, the rest as ``error``; no tokens, no cost.
    """
    state = scope.get("state", {})
    principal = scope.get("user")
    if (
        state.get("usage_recorded")
        or "model" not in state
        or not isinstance(principal, Principal)
        or principal.tenant_id is None
    ):
        return
    state["usage_recorded"] = True
    status = EventStatus.REJECTED if status_code in (429, 503) else EventStatus.ERROR
    event = recorder.event(
        principal,
        request_id_of(scope),
        model=str(state["model"]),
        operation=_OPERATIONS.get(str(scope.get("path", "")), "unknown"),
        status=status,
    )
    recorder.record_later(event)


class Receipt:
    """What one request needs to make its usage event: who pays and for what operation."""

    __slots__ = ("operation", "principal", "recorder", "state")

    def __init__(
        self,
        recorder: UsageRecorder,
        principal: Principal,
        operation: str,
        state: dict[str, Any],
    ) -> None:
        self.recorder = recorder
        self.principal = principal
        self.operation = operation
        self.state = state

    def event(
        self,
        request_id: str,
        *,
        model: str,
        status: EventStatus,
        prompt_tokens: int = 0,
        cached_tokens: int = 0,
        completion_tokens: int = 0,
        started: float,
        first_token_at: float | None = None,
    ) -> UsageEvent:
        """The request's one event (the request is marked as having one)."""
        self.state["usage_recorded"] = True
        return self.recorder.event(
            self.principal,
            request_id,
            model=model,
            operation=self.operation,
            status=status,
            prompt_tokens=prompt_tokens,
            cached_tokens=cached_tokens,
            completion_tokens=completion_tokens,
            latency_s=time.perf_counter() - started,
            ttft_s=None if first_token_at is None else first_token_at - started,
        )


def cost_header(event: UsageEvent) -> dict[str, str]:
    """The receipt header of a non-streamed answer."""
    return {"x-tollgate-cost-usd": f"{event.cost_usd:f}"}
