"""The outbox: one conformance suite over SQLite, PostgreSQL and Redis, then each kind's own."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from pathlib import Path

import msgspec
import pytest
import redis.asyncio
from sqlalchemy import Engine, func, select

from billing.ledger import InvalidEvent, Ledger
from billing.outbox import Drained, Outbox, OutboxUnavailable, RedisOutbox, SqlOutbox, make_outbox
from billing.tables import outbox as outbox_table
from gateway.db import make_engine, upgrade
from tests.billing.conftest import Events, empty, sqlite_path
from tests.support.redis_server import RedisServer

ROOT = Path(__file__).resolve().parents[2]
KINDS = ("sqlite", "postgresql", "redis")
#: Short enough for a test to outwait, long enough that a live consumer keeps its claims.
CLAIM_IDLE_MS = 200

OutboxFactory = Callable[[], Awaitable[Outbox]]


@pytest.fixture(params=KINDS)
async def new_outbox(request: pytest.FixtureRequest) -> AsyncIterator[OutboxFactory]:
    """Makes outboxes of one kind on one empty store (each a new consumer on Redis)."""
    made: list[Outbox] = []
    engine: Engine | None = None
    client: redis.asyncio.Redis | None = None
    if request.param == "redis":
        client = redis.asyncio.Redis.from_url(request.getfixturevalue("redis_url"))
    else:
        engine = make_engine(request.getfixturevalue(f"{request.param}_url"))
        empty(engine)

    async def make() -> Outbox:
        box: Outbox
        if client is not None:
            box = RedisOutbox(client, claim_idle_ms=CLAIM_IDLE_MS)
        else:
            assert engine is not None
            box = SqlOutbox(engine)
        made.append(box)
        return box

    yield make
    for box in made:
        await box.close()
    if client is not None:
        await client.aclose()
    if engine is not None:
        engine.dispose()


async def test_append_claim_ack_in_order(new_outbox: OutboxFactory, events: Events) -> None:
    box = await new_outbox()
    appended = [events.make() for _ in range(25)]
    for event in appended:
        await box.append(event)
    first = await box.claim(10)
    assert [event for _, event in first] == appended[:10]
    await box.ack([handle for handle, _ in first])
    rest = await box.claim(100)
    assert [event for _, event in rest] == appended[10:]
    await box.ack([handle for handle, _ in rest])
    assert await box.claim(100) == []
    await box.ack([])


async def test_events_round_trip_exactly(new_outbox: OutboxFactory, events: Events) -> None:
    box = await new_outbox()
    event = msgspec.structs.replace(events.make(), cost_usd=Decimal("123456.000000000001"))
    await box.append(event)
    [(_, claimed)] = await box.claim(1)
    assert claimed == event
    assert claimed.cost_usd == event.cost_usd


async def test_unacknowledged_events_are_delivered_again_after_a_crash(
    new_outbox: OutboxFactory, events: Events
) -> None:
    box = await new_outbox()
    appended = [events.make() for _ in range(6)]
    for event in appended:
        await box.append(event)
    claimed = await box.claim(4)
    assert [event for _, event in claimed] == appended[:4]
    # The consumer dies without acknowledging; another one takes over.
    survivor = await new_outbox()
    await asyncio.sleep(CLAIM_IDLE_MS * 2 / 1000)
    again = await survivor.claim(10)
    assert [event for _, event in again] == appended
    await survivor.ack([handle for handle, _ in again])
    assert await survivor.claim(10) == []


async def test_invalid_events_are_refused_at_append(
    new_outbox: OutboxFactory, events: Events
) -> None:
    box = await new_outbox()
    with pytest.raises(InvalidEvent):
        await box.append(msgspec.structs.replace(events.make(), prompt_tokens=-1))
    assert await box.claim(10) == []


# SqlOutbox


async def test_sql_drain_moves_a_batch_in_one_transaction(
    engine: Engine, ledger: Ledger, events: Events
) -> None:
    box = SqlOutbox(engine)
    try:
        appended = events.many(30)
        for event in appended:
            await box.append(event)
        # One copy is in the ledger already (a redelivery): it counts once.
        await ledger.record(appended[:1])
        assert await box.drain_into(ledger, 20) == Drained(recorded=20, dead_lettered=0)
        assert await ledger.count_events() == 20
        assert (await box.drain_into(ledger, 20)).moved == 10
        assert (await box.drain_into(ledger, 20)).moved == 0
        assert await ledger.count_events() == 30
        with engine.connect() as connection:
            assert connection.execute(select(func.count()).select_from(outbox_table)).scalar() == 0
        other = Ledger(make_engine("sqlite://"))
        with pytest.raises(ValueError, match="own database"):
            await box.drain_into(other, 10)
    finally:
        await box.close()


async def test_sql_drain_dead_letters_what_the_ledger_refuses(
    engine: Engine, ledger: Ledger, events: Events
) -> None:
    box = SqlOutbox(engine)
    try:
        await box.append(events.make())
        # A row no producer of this version writes: an event the ledger cannot store.
        payload = msgspec.json.encode(
            {
                "id": "bad",
                "occurred_at": "2026-03-01T00:00:00",
                "tenant_id": "t",
                "key_id": None,
                "model": "m",
                "operation": "chat",
            }
        )
        with engine.begin() as connection:
            connection.execute(
                outbox_table.insert().values(
                    event_id="bad", payload=payload, created_at=events.make().occurred_at
                )
            )
        # The claim hands it out as an event (it decodes); the ledger is what refuses it.
        assert len(await box.claim(10)) == 2
        assert await box.drain_into(ledger, 10) == Drained(recorded=1, dead_lettered=1)
        assert await ledger.count_events() == 1
        [letter] = await ledger.dead_letters()
        assert (letter.event_id, letter.source, letter.payload) == ("bad", "sql", payload)
        assert letter.error.startswith("InvalidEvent: ")
        assert await box.claim(10) == []
    finally:
        await box.close()


@pytest.fixture
def sqlite_file(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path}/outbox.db"
    upgrade(url)
    return url


async def test_sqlite_append_does_not_block_the_loop_on_a_held_lock(
    sqlite_file: str, events: Events
) -> None:
    engine = make_engine(sqlite_file)
    box = SqlOutbox(engine)
    holder = sqlite3.connect(sqlite_path(sqlite_file), isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        appending = asyncio.ensure_future(box.append(events.make()))
        later = asyncio.ensure_future(box.append(events.make()))
        started = time.perf_counter()
        await asyncio.sleep(0.2)
        # The loop ran on (the sleep ended on time) while both appends waited.
        assert time.perf_counter() - started < 0.5
        assert not appending.done()
        assert not later.done()
        holder.execute("COMMIT")
        await asyncio.wait_for(asyncio.gather(appending, later), 5)
        claimed = await box.claim(10)
        assert len(claimed) == 2
        # Once the waiters are done, appends take the quick path again.
        await box.append(events.make())
        assert len(await box.claim(10)) == 3
    finally:
        holder.close()
        await box.close()
        engine.dispose()


async def test_sql_outbox_reports_an_unmigrated_database(tmp_path: Path, events: Events) -> None:
    engine = make_engine(f"sqlite:///{tmp_path}/empty.db")
    box = SqlOutbox(engine)
    try:
        with pytest.raises(OutboxUnavailable, match="OperationalError") as raised:
            await box.append(events.make())
        assert str(tmp_path) not in str(raised.value)
        with pytest.raises(OutboxUnavailable):
            await box.claim(1)
    finally:
        await box.close()
        engine.dispose()


async def test_sql_outbox_full_synchronous_appends(engine: Engine, events: Events) -> None:
    box = SqlOutbox(engine, synchronous="FULL")
    try:
        event = events.make()
        await box.append(event)
        assert [claimed for _, claimed in await box.claim(10)] == [event]
    finally:
        await box.close()


async def test_postgresql_appends_survive_a_dropped_connection(
    postgresql_url: str, events: Events
) -> None:
    engine = make_engine(postgresql_url)
    empty(engine)
    box = SqlOutbox(engine)
    try:
        await box.append(events.make())
        # The server drops every other session (a failover, a restart, an idle timeout).
        with engine.begin() as connection:
            connection.exec_driver_sql(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        with pytest.raises(OutboxUnavailable):
            await box.append(events.make())
        await box.append(events.make())
        assert len(await box.claim(10)) == 2
    finally:
        await box.close()
        engine.dispose()


CHILD = """
import asyncio, sys
from datetime import UTC, datetime
from sqlalchemy import create_engine
from billing.events import UsageEvent
from billing.outbox import SqlOutbox

async def main() -> None:
    box = SqlOutbox(create_engine(sys.argv[1]))
    number = 0
    while True:
        event_id = f"req_{number:08d}"
        await box.append(UsageEvent(
            id=event_id, occurred_at=datetime.now(UTC), tenant_id="ten_a", key_id=None,
            model="demo-chat", operation="chat", prompt_tokens=number,
        ))
        sys.stdout.write(event_id + "\\n")
        sys.stdout.flush()
        number += 1

asyncio.run(main())
"""


def test_an_append_that_returned_survives_sigkill(sqlite_file: str) -> None:
    lines: list[bytes] = []
    with subprocess.Popen(
        [sys.executable, "-c", CHILD, sqlite_file],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as child:
        assert child.stdout is not None
        assert child.stderr is not None
        try:
            deadline = time.monotonic() + 60
            while len(lines) < 3000 and time.monotonic() < deadline:
                line = child.stdout.readline()
                if not line:
                    break
                lines.append(line)
            os.kill(child.pid, signal.SIGKILL)
            # Through the same buffered reader: what it holds already is part of the rest.
            lines += child.stdout.read().splitlines(keepends=True)
            errors = child.stderr.read()
        finally:
            if child.poll() is None:
                child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL, errors.decode(errors="replace")
    # Only whole lines: a line is printed once its append has returned.
    printed = [line.decode().strip() for line in lines if line.endswith(b"\n")]
    assert len(printed) >= 3000
    engine = make_engine(sqlite_file)
    try:
        with engine.connect() as connection:
            stored = set(connection.execute(select(outbox_table.c.event_id)).scalars())
    finally:
        engine.dispose()
    assert set(printed) <= stored
    # At most the one append in flight when the signal came is in without being printed.
    assert len(stored - set(printed)) <= 1


# RedisOutbox


async def test_redis_claims_nothing_of_a_live_consumer_before_it_idles(
    redis_client: redis.asyncio.Redis, events: Events
) -> None:
    first = RedisOutbox(redis_client, claim_idle_ms=60_000)
    second = RedisOutbox(redis_client, claim_idle_ms=60_000)
    for _ in range(4):
        await first.append(events.make())
    assert len(await first.claim(2)) == 2
    # The other two go to the second consumer; the first's two stay its own.
    assert len(await second.claim(10)) == 2
    assert await second.claim(10) == []


async def test_redis_acknowledged_entries_leave_the_stream(
    redis_client: redis.asyncio.Redis, events: Events
) -> None:
    box = RedisOutbox(redis_client, stream="tg:test", group="g")
    await box.append(events.make())
    await box.append(events.make())
    handles = [handle for handle, _ in await box.claim(10)]
    await box.ack(handles)
    assert await redis_client.xlen("tg:test") == 0
    assert (await redis_client.xpending("tg:test", "g"))["pending"] == 0
    # A clean close leaves the group when nothing is claimed.
    await box.close()
    assert await redis_client.xinfo_consumers("tg:test", "g") == []


async def test_redis_recovers_from_a_flushed_stream(
    redis_client: redis.asyncio.Redis, events: Events
) -> None:
    box = RedisOutbox(redis_client)
    await box.append(events.make())
    assert len(await box.claim(10)) == 1
    await redis_client.flushall()
    event = events.make()
    await box.append(event)
    assert [claimed for _, claimed in await box.claim(10)] == [event]


async def test_redis_outage_raises_outbox_unavailable_without_the_url(
    billing_redis: RedisServer, redis_url: str, events: Events
) -> None:
    box = make_outbox(make_engine("sqlite://"), redis_url, timeout_s=0.5)
    assert isinstance(box, RedisOutbox)
    try:
        await box.append(events.make())
        billing_redis.stop()
        for call in (box.append(events.make()), box.claim(10), box.ack(["1-0"])):
            with pytest.raises(OutboxUnavailable) as raised:
                await call
            assert str(billing_redis.port) not in str(raised.value)
            assert "127.0.0.1" not in str(raised.value)
        billing_redis.start()
        # The server kept what it had (append-only file): nothing appended is lost.
        assert len(await box.claim(10)) == 1
    finally:
        billing_redis.start()
        await box.close()


async def test_redis_takes_back_at_once_what_a_failed_claim_may_have_read(
    billing_redis: RedisServer, redis_url: str, events: Events
) -> None:
    """An entry the server delivered while the call failed (its reply lost with the
    connection) is this consumer's own: the next claim takes it, not another consumer
    after the claim-idle time."""
    box = make_outbox(make_engine("sqlite://"), redis_url, timeout_s=0.5)
    assert isinstance(box, RedisOutbox)
    try:
        assert await box.claim(10) == []
        event = events.make()
        await box.append(event)
        # The server hands the entry to this consumer; the reply never arrives.
        async with redis.asyncio.Redis.from_url(redis_url) as raw:
            await raw.xreadgroup("ledger", box.consumer, {"tg:usage": ">"})
        assert await box.claim(10) == []  # a call that answered: nothing was lost
        billing_redis.stop()
        with pytest.raises(OutboxUnavailable):
            await box.claim(10)
        billing_redis.start()
        assert [claimed for _, claimed in await box.claim(10)] == [event]
        assert await box.claim(10) == []
    finally:
        billing_redis.start()
        await box.close()


async def test_redis_consumer_of_a_known_name_starts_with_its_own_entries(
    redis_client: redis.asyncio.Redis, events: Events
) -> None:
    """A process that comes back under its earlier consumer name (a stable pod name) takes
    what its earlier self had claimed without acknowledging, in batches."""
    before = RedisOutbox(redis_client, consumer="gateway-0", claim_idle_ms=60_000)
    made = [events.make() for _ in range(3)]
    for event in made:
        await before.append(event)
    assert len(await before.claim(10)) == 3
    again = RedisOutbox(redis_client, consumer="gateway-0", claim_idle_ms=60_000)
    first = await again.claim(2)
    await again.ack([handle for handle, _ in first])
    rest = await again.claim(2)
    assert [event for _, event in first + rest] == made
    assert await again.claim(10) == []


async def test_make_outbox_picks_sql_without_redis(engine: Engine) -> None:
    box = make_outbox(engine, None)
    assert isinstance(box, SqlOutbox)
    await box.close()
