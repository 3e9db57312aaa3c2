"""Usage events from the request path: priced, written durably, once each, never dropped.

Where an event goes, in order, until one takes it::

    the outbox (a Redis stream, or the SQL outbox table)
      └─ the fallback outbox (the SQL table, when the outbox is the Redis stream)
           └─ the local spool (a SQLite file under the data directory, `billing.spool`)
                └─ memory, retried until one of the above answers

An event the ledger would refuse (a bug of its maker) goes to the ledger's dead letters
instead, where operators see it. A request that ends with an answer has its event written
before the answer's last byte leaves (`UsageRecorder.record` returns whether it was); one
that ends otherwise has it written in the background (`UsageRecorder.record_later`). A
background task replays what the spool (and memory) holds into the outbox as soon as it
answers, at start-up too, so what an earlier process spooled is not forgotten. The flusher
moves events from the outbox into the ledger; the ledger ignores a second copy of an id, so
a replay counts once.
"""

from __future__ import annotations

import asyncio
import contextlib
import decimal
import logging
import time
from collections.abc import Coroutine
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from billing.deadletter import Source, reject
from billing.events import CacheTier, EventStatus, UsageEvent, decode_event, encode_event
from billing.ledger import InvalidEvent, Ledger
from billing.outbox import Outbox, RedisOutbox
from billing.pricing import EXACT_CONTEXT, Price, PriceBook, device_cost, device_rate, rate
from billing.spool import Spool
from gateway.auth import Principal
from gateway.quotas.watchdog import StoreWatchdog, guarded

__all__ = ["UsageRecorder", "cost_header"]

logger = logging.getLogger(__name__)

#: The spool's kind for usage events.
EVENT = "event"
#: The spool's kind for events the ledger cannot store and the dead letters could not take
#: either (kept for an operator, not replayed).
INVALID = "invalid-event"


class UsageRecorder:
    """Prices usage with the current price book and writes the events durably.

    Args:
        outbox: Where events go first.
        ledger: The price book's source.
        fallback: Where events go when ``outbox`` fails (the SQL outbox beside a Redis one).
        spool: Where events go when both fail.
        watchdog: Tells when the outbox's Redis is down, so an append gives up at once.
        hard_timeout_s: The longest an append to the outbox may take.
        refresh_s: How often the price book is reloaded.
        replay_s: How often the spool is replayed while it holds events.
        device: The kind of this process's own engines' device and what an hour of it costs
            (USD, a decimal string): engine time of chunks that name no device (the
            in-process engines) is priced at it.
    """

    def __init__(
        self,
        outbox: Outbox,
        ledger: Ledger,
        *,
        fallback: Outbox | None = None,
        spool: Spool | None = None,
        watchdog: StoreWatchdog | None = None,
        hard_timeout_s: float = 5.0,
        refresh_s: float = 5.0,
        replay_s: float = 1.0,
        device: tuple[str, str] | None = None,
    ) -> None:
        self._device = device
        self.outbox = outbox
        self.fallback = fallback
        self.spool = spool
        self.watchdog = watchdog
        self.hard_timeout_s = hard_timeout_s
        self.ledger = ledger
        self._book = PriceBook([])
        self._refresh_s = refresh_s
        self._replay_s = replay_s
        self._refresher: asyncio.Task[None] | None = None
        self._replayer: asyncio.Task[None] | None = None
        self._replay_now = asyncio.Event()
        self._tasks: set[asyncio.Task[bool]] = set()
        #: Events nothing would take, not even the spool; retried by the replayer.
        self._unwritten: dict[str, UsageEvent] = {}
        self.spooled = 0

    async def start(self) -> None:
        await self.refresh()
        loop = asyncio.get_running_loop()
        self._refresher = loop.create_task(self._refresh_loop(), name="price-refresh")
        self._replayer = loop.create_task(self._replay_loop(), name="usage-replay")

    async def refresh(self) -> None:
        """Reload the price book (after a price change, or every ``refresh_s``)."""
        self._book = await self.ledger.price_book()

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_s)
            try:
                await self.refresh()
            except Exception:
                logger.warning("could not reload prices; keeping the previous ones")

    def price(self, model: str, when: datetime | None = None) -> Price | None:
        return self._book.price_at(model, when or datetime.now(UTC))

    def cost(
        self, model: str, prompt_tokens: int, cached_tokens: int, completion_tokens: int
    ) -> Decimal:
        """What the tokens cost at the current price (what an event of them is rated)."""
        return rate(self.price(model), prompt_tokens, cached_tokens, completion_tokens)

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
        from_response_cache: bool = False,
        gpu_ms: float | None = None,
        device: str | None = None,
        device_hour_usd: str | None = None,
    ) -> UsageEvent:
        """One request's event, priced at the version in effect now.

        ``from_response_cache``: the answer came from the response cache (a hit, or another
        request's generation shared), billed at the response-cache prices. ``gpu_ms`` is
        priced at ``device_hour_usd``, the rate of the ``device`` that served it (this
        process's own device when neither is named).
        """
        now = datetime.now(UTC)
        price = self.price(model, now)
        if from_response_cache:
            tier = CacheTier.RESPONSE
            cached_tokens = prompt_tokens
        else:
            tier = CacheTier.PREFIX if cached_tokens else CacheTier.NONE
        if gpu_ms and device is None and device_hour_usd is None and self._device is not None:
            device, device_hour_usd = self._device
        try:
            hour_usd = device_rate(device_hour_usd)
        except ValueError:
            logger.warning("device %s declares an invalid cost per hour; left unpriced", device)
            hour_usd = None
        device_usd = device_cost(gpu_ms, hour_usd)
        tokens_usd = rate(price, prompt_tokens, cached_tokens, completion_tokens, tier)
        with decimal.localcontext(EXACT_CONTEXT):
            cost_usd = tokens_usd + device_usd
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
            cache_tier=tier,
            status=status,
            latency_ms=round(latency_s * 1000, 3),
            ttft_ms=None if ttft_s is None else round(ttft_s * 1000, 3),
            gpu_ms=gpu_ms,
            device=device if gpu_ms else None,
            device_hour_usd=hour_usd if gpu_ms else None,
            device_cost_usd=device_usd,
            cost_usd=cost_usd,
            price_id=None if price is None else price.id,
        )

    async def record(self, event: UsageEvent) -> bool:
        """Write ``event`` durably, in the outbox, the fallback or the spool.

        Returns:
            Whether it was written (``False``: only memory holds it, and it is retried in
            the background; an answer must then not claim a receipt).
        """
        try:
            await self._append(event)
            return True
        except InvalidEvent as exc:
            await self._dead_letter(event, exc)
            return False
        except Exception as exc:
            logger.warning(
                "outbox append failed for %s (%s); writing it to the spool",
                event.id,
                type(exc).__name__,
            )
        if await self._to_spool(EVENT, event):
            return True
        self._unwritten[event.id] = event
        self._replay_now.set()
        return False

    def record_later(self, event: UsageEvent) -> asyncio.Task[bool]:
        """Write in the background (the request has already ended some other way).

        The task is the recorder's own: cancelling the caller does not cancel it, and
        `close` waits for it.
        """
        return self.own(self.record(event))

    def own(self, write: Coroutine[Any, Any, bool]) -> asyncio.Task[bool]:
        """Run ``write`` (a coroutine that writes an event) as a task of the recorder's."""
        task = asyncio.get_running_loop().create_task(write)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

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

    async def _dead_letter(self, event: UsageEvent, exc: InvalidEvent) -> None:
        """An event the ledger would refuse (a bug of its maker): to the dead letters, where
        operators see it, else to the spool; never dropped."""
        logger.error("usage event %s cannot be stored (%s); dead-lettered", event.id, exc)
        source: Source = "redis" if isinstance(self.outbox, RedisOutbox) else "sql"
        try:
            await self.ledger.dead_letter(source, [reject(encode_event(event), exc, event.id)])
        except Exception:
            logger.warning("could not dead-letter usage event %s; spooled", event.id)
            await self._to_spool(INVALID, event)

    async def _to_spool(self, kind: str, event: UsageEvent) -> bool:
        if self.spool is None:
            return False
        try:
            await asyncio.to_thread(self.spool.put, kind, event.id, encode_event(event))
        except OSError as exc:
            logger.error("usage event %s could not be spooled either: %s", event.id, exc)
            return False
        self.spooled += 1
        self._replay_now.set()
        return True

    @property
    def pending(self) -> int:
        """Events not in an outbox yet (spooled, or held in memory)."""
        spooled = 0
        if self.spool is not None:
            with contextlib.suppress(OSError):
                spooled = self.spool.count(EVENT)
        return spooled + len(self._unwritten)

    async def replay(self) -> int:
        """Move what the spool and memory hold into the outbox, until it fails.

        Returns:
            How many events moved.
        """
        moved = 0
        for event_id, event in list(self._unwritten.items()):
            try:
                await self._append(event)
            except InvalidEvent as exc:
                await self._dead_letter(event, exc)
            except Exception:
                if not await self._to_spool(EVENT, event):
                    return moved
            self._unwritten.pop(event_id, None)
            moved += 1
        if self.spool is None:
            return moved
        while True:
            batch = await asyncio.to_thread(self.spool.take, EVENT)
            if not batch:
                return moved
            done: list[str] = []
            try:
                for key, payload in batch:
                    event = decode_event(payload)
                    try:
                        await self._append(event)
                    except InvalidEvent as exc:
                        await self._dead_letter(event, exc)
                    done.append(key)
            except Exception:
                return moved + len(done)
            finally:
                await asyncio.to_thread(self.spool.remove, EVENT, done)
            moved += len(done)

    async def _replay_loop(self) -> None:
        # What an earlier process left in the spool, then whatever this one spools: the
        # spool is not touched while nothing has been spooled (the common case).
        pending = await self._spooled_at_start()
        while True:
            if not pending:
                await self._replay_now.wait()
            self._replay_now.clear()
            try:
                moved = await self.replay()
                if moved:
                    logger.info("replayed %d spooled usage event(s) into the outbox", moved)
                pending = bool(self._unwritten) or (
                    self.spool is not None and await asyncio.to_thread(self.spool.count, EVENT) > 0
                )
            except Exception:
                logger.warning("usage replay failed; retrying", exc_info=True)
                pending = True
            if pending:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._replay_s):
                        await self._replay_now.wait()

    async def _spooled_at_start(self) -> bool:
        if self.spool is None or not self.spool.path.exists():
            return False
        try:
            return await asyncio.to_thread(self.spool.count, EVENT) > 0
        except OSError as exc:
            logger.warning("could not read the usage spool: %s", exc)
            return False

    async def close(self, grace_s: float = 5.0) -> None:
        """Wait for writes in flight, spool what is still only in memory, and stop."""
        for task in (self._refresher, self._replayer):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        began = time.monotonic()
        while self._tasks and time.monotonic() - began < grace_s:
            await asyncio.wait(set(self._tasks), timeout=grace_s)
        for event in list(self._unwritten.values()):
            if await self._to_spool(EVENT, event):
                self._unwritten.pop(event.id, None)
        if self._unwritten:
            logger.error(
                "%d usage event(s) could not be written anywhere at shutdown: %s",
                len(self._unwritten),
                ", ".join(sorted(self._unwritten)[:10]),
            )
        if self.spool is not None:
            self.spool.close()


def cost_header(event: UsageEvent) -> dict[str, str]:
    """The receipt header of a non-streamed answer."""
    return {"x-tollgate-cost-usd": f"{event.cost_usd:f}"}
