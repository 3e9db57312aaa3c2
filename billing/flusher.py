"""The flusher: a background task that moves usage events from the outbox into the ledger.

Each round claims a batch, records it in the ledger and then acknowledges it. Delivery is
at least once (a flusher that dies between recording and acknowledging leaves the batch to
be claimed again) and the ledger ignores an event id it holds already, so every event counts
exactly once. A `SqlOutbox` in the ledger's own database is drained in one transaction
instead (`SqlOutbox.drain_into`), which needs no redelivery at all.

Nothing is ever dropped: a failed round is counted, logged, and retried after a backoff that
doubles up to ``max_backoff_s``; a claimed batch that could not be recorded is kept and
recorded again before anything new is claimed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import msgspec

from billing.events import UsageEvent
from billing.ledger import Ledger, LedgerError
from billing.outbox import Outbox, OutboxError, SqlOutbox

__all__ = ["Flusher", "FlusherStats"]

logger = logging.getLogger(__name__)


class FlusherStats(msgspec.Struct, frozen=True, kw_only=True):
    """What a flusher has done so far, for metrics."""

    #: Events moved out of the outbox into the ledger (redelivered copies included).
    events: int
    #: Rounds that moved at least one event.
    batches: int
    #: Rounds that failed (each is retried).
    errors: int
    #: Events claimed and held for a retry after a failed round.
    held: int


class Flusher:
    """Moves events from ``outbox`` into ``ledger`` in the background.

    Args:
        outbox: Where the request path appends events.
        ledger: Where they go.
        batch: The most events one round moves.
        interval_s: The pause after a round that found less than a full batch.
        max_backoff_s: The longest pause after failed rounds.
    """

    def __init__(
        self,
        outbox: Outbox,
        ledger: Ledger,
        *,
        batch: int = 1000,
        interval_s: float = 0.2,
        max_backoff_s: float = 5.0,
    ) -> None:
        if batch < 1:
            raise ValueError("batch must be at least 1")
        self._outbox = outbox
        self._ledger = ledger
        self._batch = batch
        self._interval_s = interval_s
        self._max_backoff_s = max(max_backoff_s, interval_s)
        #: Set when the outbox can move events into the ledger in one transaction.
        self._drain = isinstance(outbox, SqlOutbox) and outbox.shares_database(ledger)
        self._held: list[tuple[str, UsageEvent]] = []
        self._lock = asyncio.Lock()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._events = 0
        self._batches = 0
        self._errors = 0

    @property
    def stats(self) -> FlusherStats:
        """The counters so far."""
        return FlusherStats(
            events=self._events, batches=self._batches, errors=self._errors, held=len(self._held)
        )

    @property
    def running(self) -> bool:
        """Whether the background task runs."""
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Starts the background task (a no-op when it runs); call it from the event loop."""
        if self.running:
            return
        self._stopping.clear()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="usage-flusher")

    async def stop(self, drain: bool = True) -> None:
        """Stops the background task after its current round.

        Args:
            drain: Then move whatever the outbox still holds, until it is empty or a round
                fails (what is left stays in the durable outbox for the next start).
        """
        self._stopping.set()
        if self._task is not None:
            await self._task
            self._task = None
        if not drain:
            return
        while True:
            try:
                if await self.flush_once() == 0:
                    return
            except Exception as exc:  # the outbox keeps the rest for the next start
                logger.warning(
                    "usage flusher stopped with events left in the outbox (%s)",
                    type(exc).__name__,
                )
                return

    async def flush_once(self) -> int:
        """One round: moves up to ``batch`` events into the ledger.

        Returns:
            How many events left the outbox (zero when it was empty).

        Raises:
            Exception: whatever the outbox or the ledger raised; the round is counted as
                failed and a claimed batch is kept for the next round.
        """
        async with self._lock:
            try:
                moved = await self._round()
            except Exception:
                self._errors += 1
                raise
            if moved:
                self._events += moved
                self._batches += 1
            return moved

    async def _round(self) -> int:
        if self._drain:
            assert isinstance(self._outbox, SqlOutbox)  # what _drain means
            return await self._outbox.drain_into(self._ledger, self._batch)
        if not self._held:
            self._held = await self._outbox.claim(self._batch)
            if not self._held:
                return 0
        await self._ledger.record([event for _, event in self._held])
        await self._outbox.ack([handle for handle, _ in self._held])
        moved = len(self._held)
        self._held = []
        return moved

    async def _run(self) -> None:
        backoff = self._interval_s
        while not self._stopping.is_set():
            try:
                moved = await self.flush_once()
            except Exception as exc:  # counted in flush_once; retried after the backoff
                logger.warning(
                    "usage flush failed (%s: %s); retrying in %.1f s",
                    type(exc).__name__,
                    _safe_message(exc),
                    backoff,
                )
                logger.debug("usage flush failure", exc_info=True)
                await self._pause(backoff)
                backoff = min(backoff * 2, self._max_backoff_s)
                continue
            backoff = self._interval_s
            if moved < self._batch:
                await self._pause(self._interval_s)

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)


def _safe_message(exc: BaseException) -> str:
    """The message of the errors that are known to hold no connection details."""
    return str(exc) if isinstance(exc, (LedgerError, OutboxError)) else "see debug log"
