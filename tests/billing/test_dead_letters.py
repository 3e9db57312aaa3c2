"""Dead letters: an outbox entry the ledger cannot take is moved aside, never lost, and holds
up nothing behind it. Each test of the flusher runs on the SQL outbox and on the Redis stream,
over a ledger on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import base64
import secrets
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import msgspec
import pytest
import redis.asyncio
from litestar import Litestar
from litestar.testing import AsyncTestClient
from sqlalchemy import Engine, func, select
from sqlalchemy.exc import OperationalError

from billing.deadletter import ERROR_LENGTH, Rejected, Source, describe, read_event_id
from billing.events import UsageEvent, encode_event
from billing.flusher import Flusher
from billing.ledger import InvalidEvent, Ledger
from billing.outbox import Outbox, RedisOutbox, SqlOutbox
from billing.tables import outbox as outbox_table
from gateway.app import create_app
from gateway.db import make_engine
from gateway.settings import Settings
from serving import EngineHost
from serving.catalog import Catalog
from tests.billing.conftest import T0, Events

KINDS = ("sql", "redis")
STREAM = "tg:usage"
#: The event id the SQL producer writes next to a corrupt payload.
ROW_EVENT_ID = "req_corrupt"


@dataclass
class Rig:
    """An outbox of one kind, the ledger, and a producer that writes raw entries into it."""

    kind: Source
    box: Outbox
    ledger: Ledger
    engine: Engine
    client: redis.asyncio.Redis | None

    async def put_raw(self, payload: bytes, event_id: str = ROW_EVENT_ID) -> None:
        """Writes ``payload`` as the producer would, without the outbox's own checks."""
        if self.client is not None:
            await self.client.xadd(STREAM, {b"e": payload})
            return
        with self.engine.begin() as connection:
            connection.execute(
                outbox_table.insert().values(event_id=event_id, payload=payload, created_at=T0)
            )

    async def append_all(self, events: Iterable[UsageEvent]) -> None:
        for event in events:
            await self.box.append(event)

    async def outbox_is_empty(self) -> bool:
        if self.client is not None:
            pending = await self.client.xpending(STREAM, "ledger")
            return bool(await self.client.xlen(STREAM) == 0 and pending["pending"] == 0)
        with self.engine.connect() as connection:
            rows = connection.execute(select(func.count()).select_from(outbox_table)).scalar()
        return rows == 0

    def expected_event_id(self, payload: bytes) -> str | None:
        """What a dead letter of ``payload`` names: the row's column, or what the payload has."""
        return ROW_EVENT_ID if self.kind == "sql" else read_event_id(payload)


@pytest.fixture(params=KINDS)
async def rig(request: pytest.FixtureRequest, engine: Engine, ledger: Ledger) -> AsyncIterator[Rig]:
    client = None
    box: Outbox
    if request.param == "redis":
        client = redis.asyncio.Redis.from_url(
            request.getfixturevalue("redis_url"), socket_timeout=2, socket_connect_timeout=2
        )
        box = RedisOutbox(client, stream=STREAM, claim_idle_ms=60_000, op_timeout_s=2)
    else:
        box = SqlOutbox(engine)
    yield Rig(request.param, box, ledger, engine, client)
    await box.close()
    if client is not None:
        await client.aclose()


def event_payload(events: Events, **changes: object) -> bytes:
    """The payload of an event with ``changes``, encoded by hand as a producer might."""
    body: dict[str, object] = msgspec.json.decode(encode_event(events.make()))
    return msgspec.json.encode({**body, **changes})


async def wait_for(flusher: Flusher, ledger: Ledger, events: int, dead: int) -> None:
    async with asyncio.timeout(30):
        # The flusher signals nothing: its counters and the ledger are what can be watched.
        while (  # noqa: ASYNC110
            await ledger.count_events() < events or flusher.stats.dead_lettered < dead
        ):
            await asyncio.sleep(0.02)


CORRUPT = {
    "not JSON": b"\x00\xff{not json",
    "not an event": b'{"id": "req_half", "tenant_id": 7}',
    "truncated": b'{"id": "req_cut", "occurred_at": "2026-03-01T12:00:00Z", "tena',
}


@pytest.mark.parametrize("payload", CORRUPT.values(), ids=CORRUPT.keys())
async def test_a_payload_that_does_not_decode_is_dead_lettered(
    rig: Rig, events: Events, payload: bytes
) -> None:
    before, after, later = events.many(7), events.many(6), events.many(5)
    await rig.append_all(before)
    await rig.put_raw(payload)
    await rig.append_all(after)
    flusher = Flusher(rig.box, rig.ledger, batch=4, interval_s=0.02, max_backoff_s=0.05)
    flusher.start()
    try:
        await wait_for(flusher, rig.ledger, 13, 1)
        # The flusher keeps going: what comes later flows as well.
        await rig.append_all(later)
        await wait_for(flusher, rig.ledger, 18, 1)
    finally:
        await flusher.stop()
    stored = {event.id for event in rig.ledger.iter_events(start=T0, end=T0.replace(year=2027))}
    assert stored == {event.id for event in [*before, *after, *later]}
    [letter] = await rig.ledger.dead_letters()
    assert letter.payload == payload
    assert letter.source == rig.kind
    assert letter.event_id == rig.expected_event_id(payload)
    assert letter.error.split(":")[0] in ("DecodeError", "ValidationError")
    assert await rig.ledger.count_dead_letters() == 1
    assert await rig.outbox_is_empty()
    stats = flusher.stats
    assert (stats.events, stats.dead_lettered, stats.errors, stats.held) == (18, 1, 0, 0)


REFUSED = {
    "model too long": {"model": "m" * 201},
    "naive time": {"occurred_at": "2026-03-01T12:00:00"},
    "NUL in a string": {"tenant_id": "ten_\x00a"},
    "price id out of range": {"price_id": 2**40},
}


@pytest.mark.parametrize("changes", REFUSED.values(), ids=REFUSED.keys())
async def test_an_event_the_ledger_refuses_is_dead_lettered(
    rig: Rig, events: Events, changes: dict[str, object]
) -> None:
    good = events.many(9)
    payload = event_payload(events, id="req_refused", **changes)
    await rig.append_all(good[:5])
    await rig.put_raw(payload, event_id="req_refused")
    await rig.append_all(good[5:])
    flusher = Flusher(rig.box, rig.ledger, batch=100, interval_s=0.02, max_backoff_s=0.05)
    flusher.start()
    try:
        await wait_for(flusher, rig.ledger, 9, 1)
        late = events.make()
        await rig.box.append(late)
        await wait_for(flusher, rig.ledger, 10, 1)
    finally:
        await flusher.stop()
    assert await rig.ledger.count_events() == 10
    [letter] = await rig.ledger.dead_letters()
    assert (letter.event_id, letter.source, letter.payload) == ("req_refused", rig.kind, payload)
    assert letter.error.startswith("InvalidEvent: event 'req_refused': ")
    assert await rig.outbox_is_empty()
    assert flusher.stats.dead_lettered == 1
    assert flusher.stats.errors == 0


async def test_good_and_bad_entries_in_one_batch(rig: Rig, events: Events) -> None:
    good = events.many(12)
    bad = [
        b"garbage",
        event_payload(events, id="req_long", model="x" * 300),
        b"[]",
        event_payload(events, id="req_negative", prompt_tokens=-5),
    ]
    for index, event in enumerate(good):
        await rig.box.append(event)
        if index % 3 == 2:
            await rig.put_raw(bad[index // 3], event_id=f"req_bad{index}")
    flusher = Flusher(rig.box, rig.ledger, batch=1000)
    assert await flusher.flush_once() == 16
    assert await flusher.flush_once() == 0
    assert await rig.ledger.count_events() == 12
    letters = await rig.ledger.dead_letters()
    assert sorted(letter.payload for letter in letters) == sorted(bad)
    # Newest first.
    assert [letter.seq for letter in letters] == sorted((x.seq for x in letters), reverse=True)
    assert flusher.stats.dead_lettered == 4
    assert flusher.stats.batches == 1
    assert await rig.outbox_is_empty()


async def test_a_redis_entry_without_the_event_field_is_dead_lettered(
    redis_client: redis.asyncio.Redis, ledger: Ledger, events: Events
) -> None:
    box = RedisOutbox(redis_client, stream=STREAM)
    event = events.make()
    await box.append(event)
    await redis_client.xadd(STREAM, {b"something": b"else\xff"})
    flusher = Flusher(box, ledger)
    try:
        assert await flusher.flush_once() == 2
    finally:
        await box.close()
    assert await ledger.count_events() == 1
    [letter] = await ledger.dead_letters()
    assert letter.source == "redis"
    assert letter.event_id is None
    assert msgspec.json.decode(letter.payload) == {"something": "else\\xff"}
    assert letter.error == "LookupError: the stream entry has no field 'e'"
    assert await redis_client.xlen(STREAM) == 0


class PickyLedger(Ledger):
    """A ledger that refuses, as a whole batch, any batch holding one of ``refused``."""

    def __init__(self, engine: Engine, refused: set[str]) -> None:
        super().__init__(engine)
        self.refused = refused
        self.calls = 0

    async def record(self, events: Iterable[UsageEvent]) -> int:
        self.calls += 1
        batch = list(events)
        for event in batch:
            if event.id in self.refused:
                raise InvalidEvent(f"event {event.id!r}: refused")
        return await super().record(batch)


async def test_a_batch_refused_for_no_reason_check_event_finds_is_split(
    redis_client: redis.asyncio.Redis, engine: Engine, events: Events
) -> None:
    box = RedisOutbox(redis_client, stream=STREAM)
    appended = events.many(6)
    ledger = PickyLedger(engine, {appended[1].id, appended[4].id})
    for event in appended:
        await box.append(event)
    flusher = Flusher(box, ledger)
    try:
        assert await flusher.flush_once() == 6
    finally:
        await box.close()
    assert await ledger.count_events() == 4
    letters = await ledger.dead_letters()
    assert {letter.event_id for letter in letters} == {appended[1].id, appended[4].id}
    assert {letter.payload for letter in letters} == {
        encode_event(appended[1]),
        encode_event(appended[4]),
    }
    assert all(letter.error.endswith(": refused") for letter in letters)
    # The batch, then each of its six events on its own.
    assert ledger.calls == 7


class FlakyAckOutbox(RedisOutbox):
    """A Redis outbox whose first acknowledgement fails after the server has done nothing."""

    def __init__(self, client: redis.asyncio.Redis) -> None:
        super().__init__(client, stream=STREAM)
        self.failures = 1

    async def ack(self, handles: Sequence[str]) -> None:
        if self.failures:
            self.failures -= 1
            raise ConnectionError("connection reset")
        await super().ack(handles)


class FlakyDeadLetterLedger(Ledger):
    """A ledger whose database fails the first dead-letter write."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine)
        self.failures = 1

    async def dead_letter(self, source: Source, rejected: Iterable[Rejected]) -> int:
        if self.failures:
            self.failures -= 1
            raise OperationalError("INSERT", {}, ConnectionError("database went away"))
        return await super().dead_letter(source, rejected)


@pytest.mark.parametrize("failing", ["ack", "dead letter"])
async def test_a_failed_round_stores_each_dead_letter_once(
    redis_client: redis.asyncio.Redis, engine: Engine, events: Events, failing: str
) -> None:
    box = FlakyAckOutbox(redis_client) if failing == "ack" else RedisOutbox(redis_client)
    ledger = FlakyDeadLetterLedger(engine) if failing == "dead letter" else Ledger(engine)
    good = events.many(3)
    for event in good:
        await box.append(event)
    await redis_client.xadd(STREAM, {b"e": b"poison"})
    flusher = Flusher(box, ledger)
    try:
        with pytest.raises((ConnectionError, OperationalError)):
            await flusher.flush_once()
        assert flusher.stats.held == 4
        assert await flusher.flush_once() == 4
    finally:
        await box.close()
    assert await ledger.count_events() == 3
    assert await ledger.count_dead_letters() == 1
    stats = flusher.stats
    assert (stats.events, stats.dead_lettered, stats.errors, stats.held) == (3, 1, 1, 0)
    assert await redis_client.xlen(STREAM) == 0


async def test_claim_leaves_out_what_does_not_decode(rig: Rig, events: Events) -> None:
    event = events.make()
    await rig.box.append(event)
    await rig.put_raw(b"{")
    assert [claimed for _, claimed in await rig.box.claim(10)] == [event]
    # The entries show it, with its raw payload and the reason.
    if rig.client is not None:
        await rig.client.xgroup_setid(STREAM, "ledger", "0")
    entries = await rig.box.claim_entries(10)
    assert [entry.event for entry in entries] == [event, None]
    rejected = entries[1].rejected
    assert rejected is not None
    assert rejected.payload == entries[1].payload == b"{"
    assert rejected.error.startswith("DecodeError: ")


# The ledger's dead letters


async def test_dead_letters_are_listed_newest_first_and_counted(ledger: Ledger) -> None:
    assert await ledger.dead_letters() == []
    assert await ledger.count_dead_letters() == 0
    payloads = [bytes(range(256)), b"", b"\x00" * 10]
    first = [
        Rejected(payload=p, error=f"E{i}: x", event_id=f"req_{i}") for i, p in enumerate(payloads)
    ]
    assert await ledger.dead_letter("redis", first) == 3
    assert await ledger.dead_letter("sql", [Rejected(payload=b"z", error="E3: y")]) == 1
    assert await ledger.dead_letter("sql", []) == 0
    newest = await ledger.dead_letters(limit=2)
    assert [(d.source, d.event_id, d.payload) for d in newest] == [
        ("sql", None, b"z"),
        ("redis", "req_2", b"\x00" * 10),
    ]
    every = await ledger.dead_letters()
    assert [d.payload for d in every] == [b"z", *reversed(payloads)]
    assert all(d.created_at.tzinfo is not None for d in every)
    assert await ledger.count_dead_letters() == 4
    with pytest.raises(ValueError, match="limit"):
        await ledger.dead_letters(limit=0)


async def test_dead_letter_text_is_storable_on_every_backend(ledger: Ledger) -> None:
    error = describe(InvalidEvent("bad \x00 value " + "y" * 1000))
    assert len(error) == ERROR_LENGTH
    assert "\x00" not in error
    assert read_event_id(b'{"id": "a\\u0000b"}') == "a\ufffdb"
    assert read_event_id(b'{"id": "' + b"i" * 100 + b'"}') == "i" * 64
    assert read_event_id(b'{"id": ""}') is None
    assert read_event_id(b'{"id": 5}') is None
    await ledger.dead_letter("sql", [Rejected(payload=b"p", error=error, event_id="a\ufffdb")])
    [letter] = await ledger.dead_letters()
    assert letter.error == error


# The admin route


@pytest.fixture
async def gateway_client(
    tmp_path: Path,
) -> AsyncIterator[tuple[AsyncTestClient[Litestar], str, Ledger]]:
    token = "tga_" + secrets.token_urlsafe(24)
    settings = Settings(data_dir=str(tmp_path), admin_token=token, log_level="WARNING")
    app = create_app(settings, host=EngineHost(Catalog([])))
    engine = make_engine(settings.database)
    async with AsyncTestClient(app) as client:
        yield client, token, Ledger(engine)
    engine.dispose()


async def test_the_operator_reads_the_dead_letters(
    gateway_client: tuple[AsyncTestClient[Litestar], str, Ledger],
) -> None:
    client, token, ledger = gateway_client
    operator = {"authorization": f"Bearer {token}"}
    empty = await client.get("/admin/v1/billing/dead-letters", headers=operator)
    assert empty.status_code == 200, empty.text
    assert empty.json() == {"object": "list", "data": [], "total": 0}
    await ledger.dead_letter("redis", [Rejected(payload=b"\x00\xffraw", error="DecodeError: x")])
    await ledger.dead_letter(
        "sql", [Rejected(payload=b"{}", error="InvalidEvent: y", event_id="req_1")]
    )
    answer = await client.get("/admin/v1/billing/dead-letters?limit=1", headers=operator)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["object"] == "list"
    assert body["total"] == 2
    [letter] = body["data"]
    assert set(letter) == {"seq", "event_id", "source", "error", "created_at", "payload"}
    assert (letter["event_id"], letter["source"], letter["error"]) == (
        "req_1",
        "sql",
        "InvalidEvent: y",
    )
    assert base64.b64decode(letter["payload"]) == b"{}"
    assert datetime.fromisoformat(letter["created_at"]).tzinfo is not None
    both = (await client.get("/admin/v1/billing/dead-letters", headers=operator)).json()
    assert [base64.b64decode(d["payload"]) for d in both["data"]] == [b"{}", b"\x00\xffraw"]
    for bad in ("0", "1001", "lots"):
        refused = await client.get(f"/admin/v1/billing/dead-letters?limit={bad}", headers=operator)
        assert refused.status_code == 400, bad
        assert "error" in refused.json()


async def test_a_tenant_admin_may_not_read_the_dead_letters(
    gateway_client: tuple[AsyncTestClient[Litestar], str, Ledger],
) -> None:
    client, token, _ = gateway_client
    operator = {"authorization": f"Bearer {token}"}
    tenant = (await client.post("/admin/v1/tenants", json={"name": "t"}, headers=operator)).json()
    key = await client.post(
        f"/admin/v1/tenants/{tenant['id']}/keys",
        json={"name": "owner", "role": "admin"},
        headers=operator,
    )
    assert key.status_code == 201, key.text
    tenant_admin = {"authorization": f"Bearer {key.json()['value']}"}
    assert (await client.get("/admin/v1/usage", headers=tenant_admin)).status_code == 200
    answer = await client.get("/admin/v1/billing/dead-letters", headers=tenant_admin)
    assert answer.status_code == 403
    assert answer.json()["error"]["message"] == "Only the operator may read the dead letters."
    assert (await client.get("/admin/v1/billing/dead-letters")).status_code == 401
