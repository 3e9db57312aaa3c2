"""The ledger on SQLite and PostgreSQL: idempotent writes, exact rollups, reports, prices."""

from __future__ import annotations

import asyncio
import decimal
from collections import defaultdict
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import msgspec
import pytest
from sqlalchemy import Engine, func, inspect, select
from sqlalchemy.orm import Session

from billing.events import CacheTier, UsageEvent
from billing.invoices import build_invoice
from billing.ledger import InvalidEvent, Ledger, PriceConflict
from billing.pricing import (
    EXACT_CONTEXT,
    Price,
    PriceBook,
    TokenClass,
    class_amounts,
    device_cost,
    quantities,
    rerate,
)
from billing.tables import usage_rollup
from gateway.db import current
from gateway.db.migrate import head
from tests.billing.conftest import T0, Events

BILLING_TABLES = {"price", "usage_event", "usage_rollup", "outbox", "usage_dead_letter"}


def rollup_totals(engine: Engine) -> dict[str, Any]:
    """Sums over every rollup row, added in Python (exact on both backends)."""
    with engine.connect() as connection:
        rows = connection.execute(select(usage_rollup)).mappings().all()
    totals: dict[str, Any] = {}
    for name in ("requests", "prompt_tokens", "cached_tokens", "completion_tokens"):
        totals[name] = sum(int(row[name]) for row in rows)
    for name in ("input_cost", "cached_input_cost", "output_cost", "cost_usd"):
        totals[name] = sum((row[name] for row in rows), Decimal(0))
    return totals


def event_totals(events: list[UsageEvent], prices: dict[int, Price]) -> dict[str, Any]:
    costs = {cls: Decimal(0) for cls in TokenClass}
    for event in events:
        version = None if event.price_id is None else prices[event.price_id]
        amounts = class_amounts(
            version, event.prompt_tokens, event.cached_tokens, event.completion_tokens
        )
        for cls, amount in amounts.items():
            costs[cls] += amount
    return {
        "requests": len(events),
        "prompt_tokens": sum(e.prompt_tokens for e in events),
        "cached_tokens": sum(e.cached_tokens for e in events),
        "completion_tokens": sum(e.completion_tokens for e in events),
        "input_cost": costs[TokenClass.INPUT],
        "cached_input_cost": costs[TokenClass.CACHED_INPUT],
        "output_cost": costs[TokenClass.OUTPUT],
        "cost_usd": sum((e.cost_usd for e in events), Decimal(0)),
    }


def test_migrations_reach_head_with_the_billing_tables(engine: Engine) -> None:
    assert current(str(engine.url.render_as_string(hide_password=False))) == head() == "0007"
    assert BILLING_TABLES.issubset(inspect(engine).get_table_names())


async def test_an_event_written_twice_counts_once(
    ledger: Ledger, engine: Engine, events: Events, demo_price: Price
) -> None:
    batch = events.many(20, price=demo_price)
    assert await ledger.record(batch) == 20
    assert await ledger.record(batch) == 0
    assert await ledger.record([*batch[:5], events.make(price=demo_price)]) == 1
    # The same id twice in one batch counts once too.
    again = events.make(price=demo_price)
    assert await ledger.record([again, again]) == 1
    assert await ledger.count_events() == 22
    totals = rollup_totals(engine)
    assert totals["requests"] == 22
    assert totals == event_totals([*batch, *(await _all(ledger))[20:]], {demo_price.id: demo_price})


async def _all(ledger: Ledger) -> list[UsageEvent]:
    start, end = datetime(2000, 1, 1, tzinfo=UTC), datetime(2100, 1, 1, tzinfo=UTC)
    found = await asyncio.to_thread(lambda: list(ledger.iter_events(start=start, end=end)))
    return sorted(found, key=lambda e: e.id)


async def test_rollups_equal_the_sums_of_the_events(
    ledger: Ledger, engine: Engine, events: Events, demo_price: Price
) -> None:
    later = await ledger.set_price(
        "demo-chat", Decimal("1.5"), Decimal("0.5"), Decimal("3"), T0 + timedelta(days=1)
    )
    batch = [
        *events.many(300, price=demo_price),
        *events.many(100, price=later, start=T0 + timedelta(days=1)),
        *events.many(50, price=None),
    ]
    for start in range(0, len(batch), 64):
        await ledger.record(batch[start : start + 64])
    expected = event_totals(batch, {demo_price.id: demo_price, later.id: later})
    assert rollup_totals(engine) == expected
    assert await ledger.sum_cost() == expected["cost_usd"]
    assert await ledger.count_events() == len(batch)
    # The class costs add up to the events' costs exactly.
    totals = rollup_totals(engine)
    assert totals["cost_usd"] == sum(
        (totals[name] for name in ("input_cost", "cached_input_cost", "output_cost")),
        Decimal(0),
    )


async def test_costs_stay_exact(ledger: Ledger, events: Events, demo_price: Price) -> None:
    tiny = events.make(price=demo_price, usage=(1, 0, 0))
    assert tiny.cost_usd == Decimal("0.000000150001")
    big = msgspec.structs.replace(
        events.make(price=demo_price), cost_usd=Decimal("123456789012345678.123456789012")
    )
    batch = [tiny, *(msgspec.structs.replace(tiny, id=f"tiny-{i}") for i in range(999)), big]
    await ledger.record(batch)
    with decimal.localcontext(EXACT_CONTEXT):
        expected = Decimal("0.000000150001") * 1000 + big.cost_usd
    total = await ledger.sum_cost()
    assert total == expected
    assert str(total) == "123456789012345678.123606790012"
    [day] = await ledger.usage(
        tenant_id="ten_a", start=T0.date(), end=T0.date() + timedelta(days=1), group_by="day"
    )
    assert day["cost_usd"] == expected


async def test_usage_groups_by_model_day_and_key(
    ledger: Ledger, events: Events, demo_price: Price
) -> None:
    other = await ledger.set_price(
        "other", Decimal("2"), Decimal("1"), Decimal("4"), T0 - timedelta(days=1)
    )
    day1, day2 = T0, T0 + timedelta(days=1)
    batch = [
        events.make(price=demo_price, usage=(10, 0, 1), when=day1),
        events.make(price=demo_price, usage=(20, 5, 2), when=day2, key_id="key_b"),
        events.make(price=other, model="other", usage=(30, 0, 3), when=day2, key_id=None),
        events.make(price=other, model="other", usage=(1, 0, 1), when=day1, tenant_id="ten_b"),
    ]
    await ledger.record(batch)
    bounds = {"start": day1.date(), "end": day2.date() + timedelta(days=1)}

    by_model = await ledger.usage(tenant_id="ten_a", group_by="model", **bounds)
    assert [row["model"] for row in by_model] == ["demo-chat", "other"]
    assert by_model[0]["requests"] == 2
    assert by_model[0]["prompt_tokens"] == 30
    assert by_model[0]["cached_tokens"] == 5
    assert by_model[0]["completion_tokens"] == 3
    assert by_model[0]["cost_usd"] == batch[0].cost_usd + batch[1].cost_usd
    assert by_model[1]["cost_usd"] == batch[2].cost_usd

    by_day = await ledger.usage(tenant_id="ten_a", group_by="day", **bounds)
    assert [(row["day"], row["requests"]) for row in by_day] == [
        (day1.date(), 1),
        (day2.date(), 2),
    ]
    by_key = await ledger.usage(tenant_id="ten_a", group_by="key", **bounds)
    assert [(row["key_id"], row["requests"]) for row in by_key] == [
        (None, 1),
        ("key_a", 1),
        ("key_b", 1),
    ]
    everyone = await ledger.usage(tenant_id=None, group_by="model", **bounds)
    assert [row["requests"] for row in everyone] == [2, 2]
    # The end is exclusive; a datetime bound must be a UTC midnight.
    only_day1 = await ledger.usage(
        tenant_id="ten_a",
        start=datetime(2026, 3, 1, tzinfo=UTC),
        end=datetime(2026, 3, 2, tzinfo=UTC),
        group_by="model",
    )
    assert [row["requests"] for row in only_day1] == [1]
    with pytest.raises(ValueError, match="midnight"):
        await ledger.usage(tenant_id=None, start=T0, end=T0, group_by="day")
    with pytest.raises(ValueError, match="group_by"):
        await ledger.usage(tenant_id=None, group_by="tenant", **bounds)  # type: ignore[arg-type]  # the mistake under test
    assert await ledger.usage(tenant_id="nobody", group_by="day", **bounds) == []


async def test_invoice_rows_add_up_to_the_events(
    ledger: Ledger, events: Events, demo_price: Price
) -> None:
    later = await ledger.set_price(
        "demo-chat",
        Decimal("1.000001"),
        Decimal("0.1"),
        Decimal("2"),
        T0 + timedelta(days=2),
        response_input_per_mtok=Decimal("0.05"),
        response_output_per_mtok=Decimal("0.3"),
    )
    hit = CacheTier.RESPONSE
    batch = [
        *events.many(120, price=demo_price),
        *events.many(60, price=later, start=T0 + timedelta(days=2)),
        # Answers from the response cache, at each version's response-cache prices.
        events.make(price=demo_price, tenant_id="ten_1", usage=(90, 90, 30), tier=hit),
        events.make(
            price=later,
            tenant_id="ten_1",
            usage=(50, 50, 11),
            tier=hit,
            when=T0 + timedelta(days=3),
        ),
        events.make(price=None, model="free", usage=(7, 0, 3)),
        # Another tenant's usage is not on this invoice.
        events.make(price=demo_price, tenant_id="ten_z"),
    ]
    await ledger.record(batch)
    tenant = "ten_1"
    mine = [e for e in batch if e.tenant_id == tenant]
    rows = await ledger.invoice_rows(tenant, date(2026, 3, 1), date(2026, 4, 1))

    quantity: dict[tuple[str, int | None, TokenClass], int] = defaultdict(int)
    amount: dict[tuple[str, int | None, TokenClass], Decimal] = defaultdict(Decimal)
    versions = {demo_price.id: demo_price, later.id: later}
    for event in mine:
        version = None if event.price_id is None else versions[event.price_id]
        tokens = (event.prompt_tokens, event.cached_tokens, event.completion_tokens)
        counts = quantities(*tokens, event.cache_tier)
        amounts = class_amounts(version, *tokens, event.cache_tier)
        for cls in TokenClass:
            quantity[(event.model, event.price_id, cls)] += counts[cls]
            amount[(event.model, event.price_id, cls)] += amounts[cls]
    assert {
        (row.model, row.price_id, row.token_class): (row.quantity, row.amount) for row in rows
    } == {key: (quantity[key], amount[key]) for key in quantity if quantity[key] or amount[key]}
    for row in rows:
        version = versions[row.price_id] if row.price_id is not None else None
        assert row.unit_price == (
            Decimal(0) if version is None else version.per_mtok(row.token_class)
        )
    assert sum((row.amount for row in rows), Decimal(0)) == sum(
        (e.cost_usd for e in mine), Decimal(0)
    )
    assert {row.token_class for row in rows} == set(TokenClass)
    invoice = build_invoice(tenant, "Tenant One", "2026-03", rows)
    assert invoice.exact_total_usd == sum((e.cost_usd for e in mine), Decimal(0))
    # The bounds period_bounds gives (UTC midnights) work as they are.
    assert (
        await ledger.invoice_rows(
            tenant, datetime(2026, 3, 1, tzinfo=UTC), datetime(2026, 4, 1, tzinfo=UTC)
        )
        == rows
    )
    assert await ledger.invoice_rows(tenant, date(2026, 4, 1), date(2026, 5, 1)) == []


async def test_prices_are_versions_that_never_change(ledger: Ledger) -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    first = await ledger.set_price("m", Decimal("1"), Decimal("0.5"), Decimal("2"), start)
    assert first.id > 0
    assert first.input_per_mtok == Decimal("1.000000")
    # The same version again is the stored one (a repeated PUT).
    assert await ledger.set_price("m", Decimal("1.0"), Decimal("0.5"), Decimal("2"), start) == first
    with pytest.raises(PriceConflict):
        await ledger.set_price("m", Decimal("9"), Decimal("0.5"), Decimal("2"), start)
    second = await ledger.set_price(
        "m", Decimal("3"), Decimal("1"), Decimal("6"), start + timedelta(days=31)
    )
    await ledger.set_price("n", Decimal("0"), Decimal("0"), Decimal("0"), start)
    assert await ledger.prices("m") == [first, second]
    assert [p.model for p in await ledger.prices()] == ["m", "m", "n"]
    book = await ledger.price_book()
    assert book.price_at("m", start + timedelta(days=3)) == first
    assert book.price_at("m", start + timedelta(days=31)) == second
    assert book.price_at("m", start - timedelta(seconds=1)) is None


@pytest.mark.parametrize(
    ("amount", "error"),
    [
        (Decimal("0.0000001"), ValueError),
        (Decimal("-1"), ValueError),
        (Decimal("1e12"), ValueError),
        (1.5, TypeError),
    ],
)
async def test_invalid_prices_are_refused(ledger: Ledger, amount: object, error: type) -> None:
    with pytest.raises(error):
        await ledger.set_price("m", amount, Decimal(1), Decimal(1), T0)  # type: ignore[arg-type]  # the mistake under test
    with pytest.raises(ValueError, match="timezone"):
        await ledger.set_price("m", Decimal(1), Decimal(1), Decimal(1), datetime(2026, 1, 1))
    assert await ledger.prices() == []


@pytest.mark.parametrize(
    "change",
    [
        {"occurred_at": datetime(2026, 1, 1)},
        {"prompt_tokens": -1},
        {"cost_usd": Decimal("0.0000000000001")},
        {"cost_usd": 0.5},
        {"id": ""},
        {"tenant_id": "t" * 33},
    ],
)
async def test_invalid_events_are_refused_whole_batches_with_them(
    ledger: Ledger, events: Events, change: dict[str, object]
) -> None:
    bad = msgspec.structs.replace(events.make(), **change)
    with pytest.raises(InvalidEvent):
        await ledger.record([events.make(), bad])
    assert await ledger.count_events() == 0


async def test_iter_events_streams_in_order(
    ledger: Ledger, events: Events, demo_price: Price
) -> None:
    batch = events.many(250, price=demo_price)
    await ledger.record(reversed(batch))
    start, end = T0 + timedelta(hours=1), T0 + timedelta(hours=30)
    found = await asyncio.to_thread(
        lambda: list(ledger.iter_events(start=start, end=end, tenant_id="ten_1", batch=7))
    )
    expected = sorted(
        (e for e in batch if start <= e.occurred_at < end and e.tenant_id == "ten_1"),
        key=lambda e: (e.occurred_at, e.id),
    )
    assert found == expected
    assert len(found) > 7
    assert await ledger.count_events(start=start, end=end, tenant_id="ten_1") == len(expected)
    assert await ledger.sum_cost(start=start, end=end, tenant_id="ten_1") == sum(
        (e.cost_usd for e in expected), Decimal(0)
    )


async def test_record_sync_joins_the_callers_transaction(
    ledger: Ledger, engine: Engine, events: Events
) -> None:
    batch = events.many(10)

    def rolled_back() -> int:
        with Session(engine) as session, session.begin():
            recorded = ledger.record_sync(session, batch)
            session.rollback()
            return recorded

    assert await asyncio.to_thread(rolled_back) == 10
    assert await ledger.count_events() == 0

    def committed() -> int:
        with engine.begin() as connection:
            return ledger.record_sync(connection, batch)

    assert await asyncio.to_thread(committed) == 10
    assert await ledger.count_events() == 10
    with engine.connect() as connection:
        assert connection.execute(select(func.sum(usage_rollup.c.requests))).scalar_one() == 10


async def test_concurrent_overlapping_writes_count_once(
    ledger: Ledger, engine: Engine, events: Events, demo_price: Price
) -> None:
    batch = events.many(400, price=demo_price)
    slices = [batch[i : i + 200] for i in range(0, 400, 50)]
    writers = [Ledger(engine) for _ in slices]
    recorded = await asyncio.gather(
        *(writer.record(part) for writer, part in zip(writers, slices, strict=True))
    )
    assert sum(recorded) == 400
    assert rollup_totals(engine) == event_totals(batch, {demo_price.id: demo_price})


async def test_cached_tokens_beyond_the_prompt_are_not_billed(
    ledger: Ledger, engine: Engine, events: Events, demo_price: Price
) -> None:
    odd = events.make(price=demo_price, usage=(10, 15, 2))
    await ledger.record([odd])
    assert rollup_totals(engine)["cached_tokens"] == 10
    rows = await ledger.invoice_rows("ten_a", T0.date(), T0.date() + timedelta(days=1))
    assert {row.token_class: row.quantity for row in rows} == {
        TokenClass.CACHED_INPUT: 10,
        TokenClass.OUTPUT: 2,
    }
    assert sum((row.amount for row in rows), Decimal(0)) == odd.cost_usd
    # The event itself is stored as it came.
    [stored] = await _all(ledger)
    assert stored == odd


async def test_an_event_rated_otherwise_keeps_its_cost_and_is_logged(
    ledger: Ledger,
    engine: Engine,
    events: Events,
    demo_price: Price,
    caplog: pytest.LogCaptureFixture,
) -> None:
    rated = events.make(price=demo_price)
    odd = msgspec.structs.replace(rated, cost_usd=rated.cost_usd + Decimal("0.01"))
    unknown = msgspec.structs.replace(events.make(price=demo_price), price_id=demo_price.id + 999)
    with caplog.at_level("WARNING", logger="billing.ledger"):
        await ledger.record([odd, unknown])
    assert odd.id in caplog.text
    assert "does not have" in caplog.text
    totals = rollup_totals(engine)
    assert totals["cost_usd"] == odd.cost_usd + unknown.cost_usd
    assert await ledger.sum_cost() == totals["cost_usd"]


async def test_engine_time_rolls_up_onto_the_invoice(
    ledger: Ledger, events: Events, demo_price: Price
) -> None:
    batch = [
        msgspec.structs.replace(events.make(price=demo_price, tenant_id="ten_gpu"), gpu_ms=ms)
        for ms in (12.5, 30.25, 0.125)
    ]
    batch.append(
        msgspec.structs.replace(
            events.make(price=None, tenant_id="ten_gpu", model="free", usage=(5, 0, 1)),
            gpu_ms=1000.0,
        )
    )
    await ledger.record(batch)
    device = await ledger.device_ms("ten_gpu", date(2026, 3, 1), date(2026, 4, 1))
    assert device == {"demo-chat": pytest.approx(42.875), "free": pytest.approx(1000.0)}
    rows = await ledger.invoice_rows("ten_gpu", date(2026, 3, 1), date(2026, 4, 1))
    invoice = build_invoice("ten_gpu", "GPU", "2026-03", rows, device)
    assert invoice.device_seconds == {"demo-chat": 0.042875, "free": 1.0}
    report = await ledger.usage(
        tenant_id="ten_gpu", start=date(2026, 3, 1), end=date(2026, 4, 1), group_by="model"
    )
    assert {r["model"]: r["gpu_ms"] for r in report} == device


def priced_on(event: UsageEvent, device: str | None, hour_usd: str | None, ms: float) -> UsageEvent:
    """``event`` with ``ms`` engine milliseconds on ``device`` at ``hour_usd`` per hour."""
    rate_ = None if hour_usd is None else Decimal(hour_usd)
    device_usd = device_cost(ms, rate_)
    return msgspec.structs.replace(
        event,
        gpu_ms=ms,
        device=device,
        device_hour_usd=rate_,
        device_cost_usd=device_usd,
        cost_usd=event.cost_usd + device_usd,
    )


async def test_engine_time_is_billed_at_the_rate_of_the_device_that_served_it(
    ledger: Ledger, events: Events, demo_price: Price
) -> None:
    # A mixed fleet: an H100 at $2.49 an hour, a CPU host at $0.30, and one that declared
    # no rate (its engine time is shown, not charged).
    served = [
        ("cuda", "2.49", 1800.0),
        ("cuda", "2.49", 1800.0),
        ("cpu", "0.30", 7200.0),
        ("cpu", None, 100.0),
        ("cuda", "2.50", 360.0),  # the operator raised the rate later in the month
    ]
    batch = [
        priced_on(events.make(price=demo_price, tenant_id="ten_mix"), device, rate_, ms)
        for device, rate_, ms in served
    ]
    await ledger.record(batch)
    start, end = date(2026, 3, 1), date(2026, 4, 1)
    devices = await ledger.device_rows("ten_mix", start, end)
    assert [(r.device, r.hour_usd, r.requests, r.gpu_ms, r.amount) for r in devices] == [
        ("cpu", Decimal("0"), 1, 100.0, Decimal(0)),
        ("cpu", Decimal("0.30"), 1, 7200.0, Decimal("0.0006")),
        ("cuda", Decimal("2.49"), 2, 3600.0, Decimal("0.00249")),
        ("cuda", Decimal("2.50"), 1, 360.0, Decimal("0.00025")),
    ]
    rows = await ledger.invoice_rows("ten_mix", start, end)
    device_ms = await ledger.device_ms("ten_mix", start, end)
    invoice = build_invoice("ten_mix", "Mixed", "2026-03", rows, device_ms, devices)
    # The free line is dropped; the others are priced per device-hour.
    assert [
        (line.device, line.unit_price_per_hour, line.seconds) for line in invoice.device_lines
    ] == [
        ("cpu", Decimal("0.3"), 7.2),
        ("cuda", Decimal("2.49"), 3.6),
        ("cuda", Decimal("2.5"), 0.36),
    ]
    assert "cuda at $2.49 per device-hour" in invoice.device_lines[1].description
    # The invoice is the sum of the events, tokens and device time, to the cent.
    exact = sum((e.cost_usd for e in batch), Decimal(0))
    assert invoice.exact_total_usd == exact
    assert await ledger.sum_cost() == exact
    stored = {e.id: e for e in await _all(ledger)}
    for event in batch:
        assert stored[event.id].device == event.device
        assert stored[event.id].device_hour_usd == event.device_hour_usd
        assert stored[event.id].device_cost_usd == event.device_cost_usd
    # Rating the events again keeps each one's device cost.
    book = PriceBook([demo_price])
    assert [rerate(e, book).cost_usd for e in batch] == [e.cost_usd for e in batch]


async def test_a_device_cost_beyond_the_event_cost_is_refused(
    ledger: Ledger, events: Events
) -> None:
    odd = msgspec.structs.replace(
        events.make(price=None), gpu_ms=10.0, device_cost_usd=Decimal("0.01")
    )
    with pytest.raises(InvalidEvent, match="device_cost_usd"):
        await ledger.record([odd])
