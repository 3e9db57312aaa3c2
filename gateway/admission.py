"""Admission: reserve a request's tokens and spend before it reaches the engine, settle after.

Every request of a tenant key is checked against its tenant's limits and its key's limits in
one atomic store call. What was reserved (prompt tokens plus ``max_tokens``, priced) is settled
to the real usage when the request ends, whatever way it ends: answered, failed, or abandoned
by the client. When the store is down or hung (its watchdog finds it silent for
``quota_timeout_ms``), admission gives up: budgets fail closed (503), rate limits follow
``quota_fail_open``; a settlement (or the release of an admission whose outcome is unknown)
is kept and retried until the store answers, and the store applies each one at most once.
A settlement waiting for the store is also written to the local spool (`billing.spool`), so
it survives a restart of the gateway: the next start applies it. (One that was never
queued, because the process was killed while the request ran, is released by its lease.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable, Coroutine
from decimal import Decimal
from typing import Any, TypeVar

import msgspec

from billing.events import UsageEvent
from billing.ledger import InvalidEvent
from billing.outbox import RedisOutbox
from billing.pricing import to_nano_usd
from billing.spool import Spool
from gateway.auth import Principal
from gateway.errors import RateLimited, ServiceUnavailable
from gateway.quotas import (
    BUDGET_DIMENSIONS,
    Decision,
    Demand,
    Dimension,
    QuotaStore,
    RedisQuotaStore,
    Scope,
    StoreUnavailable,
)
from gateway.quotas.watchdog import NotSent, StoreWatchdog, guarded
from gateway.telemetry import Telemetry
from gateway.usage import UsageRecorder

__all__ = ["Admission", "Ticket", "ratelimit_headers"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Reservation cost of a request: ``(model, prompt tokens, most output tokens) -> USD``.
Pricer = Callable[[str, int, int], Decimal]

_DESCRIBE = {
    Dimension.RPM: "requests per minute",
    Dimension.TPM: "tokens per minute",
    Dimension.CONCURRENCY: "concurrent requests",
    Dimension.DAILY_TOKENS: "tokens per day",
    Dimension.MONTHLY_TOKENS: "tokens per month",
    Dimension.MONTHLY_SPEND: "spend per month",
}


def _duration(seconds: float) -> str:
    """OpenAI's reset format: ``1s``, ``6m0s``, ``120ms``."""
    if seconds < 1:
        return f"{max(math.ceil(seconds * 1000), 0)}ms"
    whole = math.ceil(seconds)
    minutes, secs = divmod(whole, 60)
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


def ratelimit_headers(decision: Decision) -> dict[str, str]:
    """The ``x-ratelimit-*`` headers of a decision (only for the limits that exist)."""
    headers: dict[str, str] = {}
    if decision.limit_requests is not None:
        headers["x-ratelimit-limit-requests"] = str(decision.limit_requests)
        headers["x-ratelimit-remaining-requests"] = str(max(decision.remaining_requests or 0, 0))
        headers["x-ratelimit-reset-requests"] = _duration(decision.reset_requests_s or 0.0)
    if decision.limit_tokens is not None:
        headers["x-ratelimit-limit-tokens"] = str(decision.limit_tokens)
        headers["x-ratelimit-remaining-tokens"] = str(max(decision.remaining_tokens or 0, 0))
        headers["x-ratelimit-reset-tokens"] = _duration(decision.reset_tokens_s or 0.0)
    return headers


class Ticket:
    """One admitted request: settle it exactly once with what it really used."""

    __slots__ = ("_admission", "_settled", "headers", "model", "partition", "request_id")

    def __init__(
        self,
        admission: Admission | None,
        partition: str,
        request_id: str,
        model: str,
        headers: dict[str, str],
    ) -> None:
        self._admission = admission
        self._settled = admission is None
        self.partition = partition
        self.request_id = request_id
        self.model = model
        self.headers = headers

    @property
    def metered(self) -> bool:
        """Whether a store holds a reservation for this request."""
        return self._admission is not None

    def settle(self, tokens: int, spend: Decimal) -> None:
        """Record the real usage (tokens, and their exact cost); later calls do nothing.

        Never blocks, never raises.
        """
        if self._settled or self._admission is None:
            return
        self._settled = True
        self._admission.settle_later(self, tokens, to_nano_usd(spend))

    async def settle_with(self, tokens: int, spend: Decimal, event: UsageEvent) -> bool:
        """Settle, and write the request's usage event durably; on Redis, in one round trip.

        Returns:
            Whether the event was written (see `UsageRecorder.record`).
        """
        admission = self._admission
        if admission is None or admission.recorder is None:
            raise RuntimeError("settle_with needs a metered ticket and a usage recorder")
        if self._settled:
            return await admission.recorder.record(event)
        self._settled = True
        return await admission.settle_and_record(self, tokens, to_nano_usd(spend), event)


#: A ticket for a request nobody counts (authentication off, or the operator).
def unmetered(request_id: str, model: str) -> Ticket:
    return Ticket(None, "", request_id, model, {})


class Admission:
    """Admits and settles requests against a quota store, surviving its outages."""

    def __init__(
        self,
        store: QuotaStore,
        telemetry: Telemetry,
        *,
        fail_open: bool,
        lease_s: float,
        pricer: Pricer | None = None,
        retry_max_s: float = 5.0,
        hard_timeout_s: float = 5.0,
        watchdog: StoreWatchdog | None = None,
        spool: Spool | None = None,
        recorder: UsageRecorder | None = None,
    ) -> None:
        self.store = store
        self.telemetry = telemetry
        self.fail_open = fail_open
        self.lease_s = lease_s
        self._pricer = pricer
        self._retry_max_s = retry_max_s
        self.hard_timeout_s = hard_timeout_s
        self.watchdog = watchdog
        self.spool = spool
        #: Writes usage events; settlements of answered requests travel with them.
        self.recorder = recorder
        # On Redis, a settlement and its event's XADD go in one round trip.
        self._combined = (
            isinstance(store, RedisQuotaStore)
            and recorder is not None
            and isinstance(recorder.outbox, RedisOutbox)
        )
        self._tasks: set[asyncio.Task[None]] = set()
        self._pending: dict[str, tuple[str, int, int]] = {}
        self._wakeup = asyncio.Event()
        self._retrier: asyncio.Task[None] | None = None

    def _spend_nusd(self, model: str, prompt_tokens: int, completion_tokens: int) -> int:
        # No price book yet: a model without a price costs nothing.
        if self._pricer is None:
            return 0
        return to_nano_usd(self._pricer(model, prompt_tokens, completion_tokens))

    async def admit(
        self,
        principal: Principal | None,
        request_id: str,
        model: str,
        prompt_tokens: int,
        max_output_tokens: int,
    ) -> Ticket:
        """Reserve the most this request can use, or refuse it.

        Raises:
            RateLimited: 429 with ``retry-after`` and the ``x-ratelimit-*`` headers.
            ServiceUnavailable: the quota store is down and a budget (or, with fail-open
                off, a rate limit) could not be checked.
        """
        if principal is None or principal.operator or principal.tenant_id is None:
            return unmetered(request_id, model)
        tenant, key = principal.tenant_limits, principal.key_limits
        if tenant.is_unlimited() and key.is_unlimited():
            return unmetered(request_id, model)
        partition = principal.tenant_id
        scopes = [Scope(f"tenant:{principal.tenant_id}", tenant)]
        if not key.is_unlimited():
            scopes.append(Scope(f"key:{principal.key_id}", key))
        demand = Demand(
            request_id=request_id,
            tokens=prompt_tokens + max_output_tokens,
            spend_nusd=self._spend_nusd(model, prompt_tokens, max_output_tokens),
        )
        try:
            decision = await self._call(self.store.admit(partition, scopes, demand, self.lease_s))
        except (StoreUnavailable, TimeoutError) as exc:
            budget = tenant.has_budget() or key.has_budget()
            sent = not isinstance(exc, NotSent)
            return self._store_down(partition, request_id, model, budget=budget, sent=sent)
        headers = ratelimit_headers(decision)
        if decision.admitted:
            self.telemetry.admissions.add(1, {"outcome": "admitted"})
            return Ticket(self, partition, request_id, model, headers)
        budget = decision.dimension in BUDGET_DIMENSIONS
        self.telemetry.admissions.add(
            1, {"outcome": "insufficient_quota" if budget else "rate_limited"}
        )
        retry_after = max(decision.retry_after_s or 1.0, 0.001)
        headers["retry-after"] = str(math.ceil(retry_after))
        headers["retry-after-ms"] = str(math.ceil(retry_after * 1000))
        if decision.dimension is None:
            raise RateLimited("This request id was already used.", budget=False, headers=headers)
        what = _DESCRIBE[decision.dimension]
        whose = "this key" if (decision.scope or "").startswith("key:") else "your organization"
        if budget:
            message = (
                f"You exceeded your quota of {what} for {whose}. "
                f"It resets in {_duration(retry_after)}."
            )
        else:
            message = (
                f"Rate limit reached on {what} for {whose}. "
                f"Please try again in {_duration(retry_after)}."
            )
        raise RateLimited(message, budget=budget, headers=headers)

    async def _call(self, call: Coroutine[Any, Any, T]) -> T:
        return await guarded(call, self.watchdog, self.hard_timeout_s)

    def _store_down(
        self, partition: str, request_id: str, model: str, *, budget: bool, sent: bool
    ) -> Ticket:
        self.telemetry.quota_store_errors.add(1, {"operation": "admit"})
        if sent:  # the admission may still land in the store: release it once it answers
            self._queue(partition, request_id, 0, 0)
        if budget or not self.fail_open:
            self.telemetry.admissions.add(1, {"outcome": "store_down_closed"})
            raise ServiceUnavailable(
                "Quotas cannot be checked right now; please retry shortly.",
                code="quota_store_unavailable",
                headers={"retry-after": "1"},
            )
        logger.debug("quota store unavailable: admitting %s without a rate limit", request_id)
        self.telemetry.admissions.add(1, {"outcome": "store_down_open"})
        return unmetered(request_id, model)

    async def start(self) -> None:
        """Take up the settlements an earlier process left in the spool."""
        if self.spool is None:
            return
        try:
            kept = await asyncio.to_thread(self.spool.take, _SETTLEMENT, 100_000)
        except OSError as exc:
            logger.warning("could not read spooled settlements: %s", exc)
            return
        for request_id, payload in kept:
            partition, tokens, spend = _decode_settlement(payload)
            self._queue(partition, request_id, tokens, spend, spool=False)
        if kept:
            logger.info("applying %d settlement(s) left by an earlier run", len(kept))

    async def settle_and_record(
        self, ticket: Ticket, tokens: int, spend: int, event: UsageEvent
    ) -> bool:
        """Settle ``ticket`` and write ``event``: one pipeline on Redis, else one after the
        other (the settlement in the background).

        Returns:
            Whether the event was written.
        """
        recorder = self.recorder
        assert recorder is not None  # Ticket.settle_with checks
        outbox = recorder.outbox
        if not self._combined or not isinstance(outbox, RedisOutbox):
            self.settle_later(ticket, tokens, spend)
            return await recorder.record(event)
        try:
            stream, fields = outbox.entry(event)
        except InvalidEvent:
            self.settle_later(ticket, tokens, spend)
            return await recorder.record(event)  # spooled aside, never dropped
        assert isinstance(self.store, RedisQuotaStore)
        try:
            settled, added = await self._call(
                self.store.settle_and_add(
                    ticket.partition, ticket.request_id, tokens, spend, stream, fields
                )
            )
        except (StoreUnavailable, TimeoutError):
            self.telemetry.quota_store_errors.add(1, {"operation": "settle"})
            self._queue(ticket.partition, ticket.request_id, tokens, spend)
            return await recorder.record(event)  # the fallback outbox, then the spool
        if settled is None:
            self._queue(ticket.partition, ticket.request_id, tokens, spend)
        return True if added else await recorder.record(event)

    def settle_later(self, ticket: Ticket, tokens: int, spend: int) -> None:
        task = asyncio.get_running_loop().create_task(
            self._settle(ticket.partition, ticket.request_id, tokens, spend)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _settle(self, partition: str, request_id: str, tokens: int, spend: int) -> None:
        try:
            await self._call(self.store.settle(partition, request_id, tokens, spend))
        except (StoreUnavailable, TimeoutError):
            self.telemetry.quota_store_errors.add(1, {"operation": "settle"})
            self._queue(partition, request_id, tokens, spend)

    def _queue(
        self, partition: str, request_id: str, tokens: int, spend: int, *, spool: bool = True
    ) -> None:
        if request_id not in self._pending:
            self.telemetry.pending_settlements.add(1)
        self._pending[request_id] = (partition, tokens, spend)
        if spool and self.spool is not None:
            self._spool_task(
                self.spool.put, _SETTLEMENT, request_id, _encode((partition, tokens, spend))
            )
        self._wakeup.set()
        if self._retrier is None or self._retrier.done():
            self._retrier = asyncio.get_running_loop().create_task(self._retry())

    def _spool_task(self, work: Any, *args: Any) -> None:
        async def run() -> None:
            try:
                await asyncio.to_thread(work, *args)
            except OSError as exc:
                logger.warning("settlement spool: %s", exc)

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def pending(self) -> int:
        """Settlements waiting for the store."""
        return len(self._pending)

    async def _retry(self) -> None:
        """Apply queued settlements once the store answers, backing off while it does not."""
        delay = 0.2
        while self._pending:
            self._wakeup.clear()
            # A queued release may race an admission still travelling to the store: wait a
            # moment first so the release lands after it (the store refuses the id anyway).
            await asyncio.sleep(delay)
            for request_id, (partition, tokens, spend) in list(self._pending.items()):
                try:
                    await self._call(self.store.settle(partition, request_id, tokens, spend))
                except (StoreUnavailable, TimeoutError):
                    delay = min(delay * 2, self._retry_max_s)
                    break
                if self._pending.pop(request_id, None) is not None:
                    self.telemetry.pending_settlements.add(-1)
                    if self.spool is not None:
                        self._spool_task(self.spool.remove, _SETTLEMENT, [request_id])
                delay = 0.2
        logger.info("quota store reachable again: pending settlements applied")

    async def close(self, grace_s: float = 5.0) -> None:
        """Wait a little for settlements in flight, then stop."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=grace_s)
        if self.watchdog is not None:
            self.watchdog.stop()
        if self._retrier is not None and self._pending:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._retrier), grace_s)
        if self._retrier is not None:
            self._retrier.cancel()
            await asyncio.gather(self._retrier, return_exceptions=True)
        if self._tasks:  # spool writes the retrier queued meanwhile
            await asyncio.wait(set(self._tasks), timeout=grace_s)
        if self._pending:
            where = "kept in the spool for the next start" if self.spool else "their leases expire"
            logger.warning(
                "%d settlement(s) not applied at shutdown; %s", len(self._pending), where
            )
        await self.store.close()


#: The spool's kind for settlements waiting for the store.
_SETTLEMENT = "settlement"
_encode = msgspec.msgpack.Encoder().encode
_decoder = msgspec.msgpack.Decoder(tuple[str, int, int])


def _decode_settlement(payload: bytes) -> tuple[str, int, int]:
    return _decoder.decode(payload)
