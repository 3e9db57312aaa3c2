"""The flusher: a background task that moves usage events from the outbox into the ledger.

Each round claims a batch, records it in the ledger and then acknowledges it. Delivery is
at least once (a flusher that dies between recording and acknowledging leaves the batch to
be claimed again) and the ledger ignores an event id it holds already, so every event counts
exactly once. A `SqlOutbox` in the ledger's own database is drained in one transaction
instead (`SqlOutbox.drain_into`), which needs no redelivery at all.

Nothing is ever dropped: a failed round is counted, logged, and retried after a backoff that
doubles up to ``max_backoff_s``; a claimed batch that could not be recorded is kept and
recorded again before anything new is claimed.

Nor does one bad entry hold up the others: an entry whose payload does not decode, or whose
event the ledger refuses (`InvalidEvent`), goes to the ledger's dead letters
(`billing.deadletter`) with its raw payload, is acknowledged, and counted in
`FlusherStats.dead_lettered`; the good events of its batch are recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

import msgspec

from billing.deadletter import Rejected, reject
from billing.events import UsageEvent
from billing.ledger import InvalidEvent, Ledger, LedgerError, check_event
from billing.outbox import Claimed, Outbox, OutboxError, SqlOutbox

__all__ = ["Flusher", "FlusherStats"]

logger = logging.getLogger(__name__)


class FlusherStats(msgspec.Struct, frozen=True, kw_only=True):
    """What a flusher has done so far, for metrics."""

    #: Events moved out of the outbox into the ledger (redelivered copies included).
    events: int
    #: Rounds that moved at least one entry.
    batches: int
    #: Rounds that failed (each is retried).
    errors: int
    #: Entries claimed and held for a retry after a failed round.
    held: int
    #: Entries moved to the dead letters: payloads that do not decode, events the ledger
    #: refuses.
    dead_lettered: int = 0


@dataclass
class _Held:
    """A claimed batch, and how far it got: kept across failed rounds."""

    handles: list[str]
    #: The events to record, each with its raw payload.
    events: list[tuple[bytes, UsageEvent]]
    #: What goes to the dead letters.
    rejected: list[Rejected] = field(default_factory=list)
    recorded: bool = False
    #: How many dead letters were stored; ``None`` until they are.
    dead_lettered: int | None = None

    @classmethod
    def of(cls, entries: list[Claimed]) -> _Held:
        held = cls(handles=[entry.handle for entry in entries], events=[])
        for entry in entries:
            if entry.event is not None:
                held.events.append((entry.payload, entry.event))
            elif entry.rejected is not None:
                held.rejected.append(entry.rejected)
        return held


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
        self._held: _Held | None = None
        self._lock = asyncio.Lock()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._events = 0
        self._batches = 0
        self._errors = 0
        self._dead_lettered = 0

    @property
    def stats(self) -> FlusherStats:
        """The counters so far."""
        return FlusherStats(
            events=self._events,
            batches=self._batches,
            errors=self._errors,
            held=0 if self._held is None else len(self._held.handles),
            dead_lettered=self._dead_lettered,
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
        """One round: moves up to ``batch`` entries into the ledger or its dead letters.

        Returns:
            How many entries left the outbox (zero when it was empty).

        Raises:
            Exception: whatever the outbox or the ledger raised; the round is counted as
                failed and a claimed batch is kept for the next round.
        """
        async with self._lock:
            try:
                recorded, dead_lettered = await self._round()
            except Exception:
                self._errors += 1
                raise
            if dead_lettered:
                logger.warning(
                    "%d usage outbox entries moved to the dead letters (%s outbox): "
                    "payloads that do not decode or events the ledger refuses",
                    dead_lettered,
                    self._outbox.source,
                )
            moved = recorded + dead_lettered
            if moved:
                self._events += recorded
                self._dead_lettered += dead_lettered
                self._batches += 1
            return moved

    async def _round(self) -> tuple[int, int]:
        """One round; returns the events recorded and the entries dead-lettered."""
        if self._drain:
            assert isinstance(self._outbox, SqlOutbox)  # what _drain means
            drained = await self._outbox.drain_into(self._ledger, self._batch)
            return drained.recorded, drained.dead_lettered
        held = self._held
        if held is None:
            entries = await self._outbox.claim_entries(self._batch)
            if not entries:
                return 0, 0
            held = self._held = _Held.of(entries)
        if not held.recorded:
            await self._record(held)
            held.recorded = True
        if held.dead_lettered is None:
            held.dead_lettered = await self._ledger.dead_letter(self._outbox.source, held.rejected)
        await self._outbox.ack(held.handles)
        self._held = None
        return len(held.events), held.dead_lettered

    async def _record(self, held: _Held) -> None:
        """Records the held events; moves those the ledger refuses to ``held.rejected``."""
        if not held.events:
            return
        try:
            await self._ledger.record([event for _, event in held.events])
            return
        except InvalidEvent:
            pass
        good, bad = [], []
        for payload, event in held.events:
            try:
                check_event(event)
            except InvalidEvent as exc:
                bad.append(reject(payload, exc, event.id))
            else:
                good.append((payload, event))
        if bad:
            held.events, held.rejected = good, [*held.rejected, *bad]
            try:
                await self._ledger.record([event for _, event in good])
                return
            except InvalidEvent:
                pass
        # The events pass the check and yet the batch is refused: one at a time.
        good, bad = [], []
        for payload, event in held.events:
            try:
                await self._ledger.record([event])
            except InvalidEvent as exc:
                bad.append(reject(payload, exc, event.id))
            else:
                good.append((payload, event))
        held.events, held.rejected = good, [*held.rejected, *bad]

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
