"""The flusher: every appended event reaches the ledger once, whatever fails in between."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable

import pytest
import redis.asyncio
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError

from billing.events import UsageEvent
from billing.flusher import Flusher
from billing.ledger import Ledger
from billing.outbox import Outbox, RedisOutbox, SqlOutbox
from billing.pricing import Price
from tests.billing.conftest import Events
from tests.billing.test_ledger import event_totals, rollup_totals
from tests.support.redis_server import RedisServer

#: The outbox kinds a flusher reads: the SQL outbox in the ledger's database, or Redis.
KINDS = ("sql", "redis")
CLAIM_IDLE_MS = 200


OutboxFactory = Callable[[], Outbox]


@pytest.fixture(params=KINDS)
async def new_outbox(
    request: pytest.FixtureRequest, engine: Engine
) -> AsyncIterator[OutboxFactory]:
    """Makes outboxes of one kind (each a new consumer on Redis); closes them afterwards."""
    made: list[Outbox] = []
    client = None
    if request.param == "redis":
        client = redis.asyncio.Redis.from_url(
            request.getfixturevalue("redis_url"), socket_timeout=1, socket_connect_timeout=1
        )

    def make() -> Outbox:
        box: Outbox
        if client is not None:
            box = RedisOutbox(client, claim_idle_ms=CLAIM_IDLE_MS, op_timeout_s=2)
        else:
            box = SqlOutbox(engine)
        made.append(box)
        return box

    yield make
    for box in made:
        await box.close()
    if client is not None:
        await client.aclose()


@pytest.fixture
def outbox(new_outbox: OutboxFactory) -> Outbox:
    return new_outbox()


async def wait_for_count(ledger: Ledger, n: int, timeout_s: float = 30) -> None:
    async with asyncio.timeout(timeout_s):
        # Polls the database: nothing there can be awaited instead.
        while await ledger.count_events() < n:  # noqa: ASYNC110
            await asyncio.sleep(0.05)


async def test_the_flusher_moves_every_event_once(
    outbox: Outbox, ledger: Ledger, engine: Engine, events: Events, demo_price: Price
) -> None:
    appended = events.many(2500, price=demo_price)
    for event in appended[:1500]:
        await outbox.append(event)
    flusher = Flusher(outbox, ledger, batch=1000, interval_s=0.05)
    flusher.start()
    try:
        for event in appended[1500:]:
            await outbox.append(event)
        await wait_for_count(ledger, 2500)
    finally:
        await flusher.stop()
    assert await ledger.count_events() == 2500
    assert rollup_totals(engine) == event_totals(appended, {demo_price.id: demo_price})
    stats = flusher.stats
    assert stats.events == 2500
    assert stats.errors == 0
    assert stats.batches >= 3
    assert await outbox.claim(10) == []


async def test_stop_drains_what_is_left(outbox: Outbox, ledger: Ledger, events: Events) -> None:
    flusher = Flusher(outbox, ledger, batch=100, interval_s=60)
    flusher.start()
    await asyncio.sleep(0.05)  # the first round found nothing and waits a minute
    for event in events.many(350):
        await outbox.append(event)
    await flusher.stop(drain=True)
    assert not flusher.running
    assert await ledger.count_events() == 350


async def test_a_crash_between_record_and_ack_makes_no_duplicates(
    new_outbox: OutboxFactory, ledger: Ledger, engine: Engine, events: Events, demo_price: Price
) -> None:
    outbox = new_outbox()
    appended = events.many(300, price=demo_price)
    for event in appended:
        await outbox.append(event)
    # A flusher claims and records a batch, then dies before acknowledging it.
    claimed = await outbox.claim(120)
    assert await ledger.record([event for _, event in claimed]) == 120
    # Another process's flusher (a new consumer) takes over once the claims idle out.
    successor = new_outbox()
    await asyncio.sleep(CLAIM_IDLE_MS * 2 / 1000)
    flusher = Flusher(successor, Ledger(engine), batch=100, interval_s=0.05)
    while await flusher.flush_once():
        pass
    assert await ledger.count_events() == 300
    assert rollup_totals(engine) == event_totals(appended, {demo_price.id: demo_price})
    # Every event left the outbox, the 120 recorded ones included.
    assert flusher.stats.events == 300


class FlakyLedger(Ledger):
    """A ledger whose database fails the first ``failures`` writes."""

    def __init__(self, engine: Engine, failures: int) -> None:
        super().__init__(engine)
        self.failures = failures

    async def record(self, events: Iterable[UsageEvent]) -> int:
        if self.failures:
            self.failures -= 1
            raise OperationalError("INSERT", {}, ConnectionError("database went away"))
        return await super().record(events)


async def test_a_failed_round_is_retried_with_the_same_batch(
    redis_url: str, engine: Engine, events: Events
) -> None:
    client = redis.asyncio.Redis.from_url(redis_url)
    box = RedisOutbox(client, claim_idle_ms=60_000, owns_client=True)
    ledger = FlakyLedger(engine, failures=2)
    flusher = Flusher(box, ledger, batch=50, interval_s=0.01, max_backoff_s=0.05)
    try:
        for event in events.many(120):
            await box.append(event)
        flusher.start()
        await wait_for_count(ledger, 120)
        await flusher.stop()
        stats = flusher.stats
        assert stats.errors == 2
        assert stats.events == 120
        assert stats.held == 0
        # The held batch was recorded again, not claimed again (a claim would wait a minute).
        assert await ledger.count_events() == 120
    finally:
        await flusher.stop(drain=False)
        await box.close()


async def test_the_flusher_outlives_a_redis_outage(
    billing_redis: RedisServer, redis_url: str, ledger: Ledger, events: Events
) -> None:
    client = redis.asyncio.Redis.from_url(redis_url, socket_timeout=0.5, socket_connect_timeout=0.5)
    box = RedisOutbox(client, op_timeout_s=1, owns_client=True)
    flusher = Flusher(box, ledger, batch=100, interval_s=0.02, max_backoff_s=0.1)
    try:
        for event in events.many(200):
            await box.append(event)
        billing_redis.stop()
        flusher.start()
        async with asyncio.timeout(20):
            # The flusher signals nothing when it fails: watching its counters is the test.
            while flusher.stats.errors < 2:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        assert flusher.running
        billing_redis.start()
        await wait_for_count(ledger, 200)
    finally:
        billing_redis.start()
        await flusher.stop()
        await box.close()
    assert await ledger.count_events() == 200


async def test_stop_gives_up_draining_when_the_store_is_down(
    billing_redis: RedisServer, redis_url: str, ledger: Ledger, events: Events
) -> None:
    client = redis.asyncio.Redis.from_url(redis_url, socket_timeout=0.5, socket_connect_timeout=0.5)
    box = RedisOutbox(client, op_timeout_s=1, owns_client=True)
    await box.append(events.make())
    flusher = Flusher(box, ledger)
    billing_redis.stop()
    try:
        await asyncio.wait_for(flusher.stop(drain=True), 10)
        assert flusher.stats.errors == 1
    finally:
        billing_redis.start()
    # The event waits in the outbox for the next flusher.
    await flusher.flush_once()
    assert await ledger.count_events() == 1
    await box.close()
