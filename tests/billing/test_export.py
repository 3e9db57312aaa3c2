"""Finance exports read back with the real readers: csv, json, pyarrow."""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import msgspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from billing.events import CacheTier, EventStatus, UsageEvent
from billing.export import (
    EVENT_COLUMNS,
    FOCUS_COLUMNS,
    FORMATS,
    ExportError,
    export,
    filename,
    media_type,
)
from billing.pricing import Price, PriceBook, TokenClass, device_cost, quantities, rate
from tests.support.focus import FOCUS_NAMED_COLUMNS

#: No example database: the tree is shared and ``.hypothesis/`` is not ignored by git.
PROPERTY = settings(database=None, deadline=None, max_examples=40)

T0 = datetime(2026, 3, 1, tzinfo=UTC)
PRICES = [
    Price(
        id=1,
        model="demo-chat",
        input_per_mtok=Decimal("0.15"),
        cached_input_per_mtok=Decimal("0.075"),
        output_per_mtok=Decimal("0.6"),
        effective_from=T0,
    ),
    Price(
        id=2,
        model="demo-chat",
        input_per_mtok=Decimal("0.2"),
        cached_input_per_mtok=Decimal("0.05"),
        output_per_mtok=Decimal("0.800001"),
        effective_from=T0 + timedelta(days=45),
    ),
    Price(
        id=3,
        model="minilm",
        input_per_mtok=Decimal("0.02"),
        cached_input_per_mtok=Decimal("0"),
        output_per_mtok=Decimal("0"),
        effective_from=T0,
    ),
]
BOOK = PriceBook(PRICES)
TENANTS = {"t-1": "Acme, Inc.", "t-2": 'The "Quoted" Co'}

FOCUS_REQUIRED = FOCUS_NAMED_COLUMNS | {
    "ChargeClass",
    "ChargeFrequency",
    "PricingCategory",
    "ProviderName",
    "PublisherName",
    "InvoiceIssuerName",
    "ResourceName",
    "ServiceCategory",
    "x_RequestId",
    "x_TokenClass",
    # FOCUS 1.0 mandatory columns beyond the ones above.
    "BillingAccountId",
    "BillingAccountName",
    "ContractedCost",
    "ContractedUnitPrice",
}
FOCUS_INSTANT = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z")


def make_event(
    n: int,
    *,
    when: datetime | None = None,
    model: str | None = None,
    usage: tuple[int, int, int] | None = None,
) -> UsageEvent:
    """A rated event; deterministic in ``n``, covering every optional and enum value."""
    model = model or ("demo-chat", "minilm", "unpriced")[n % 3]
    when = when or T0 + timedelta(minutes=37 * n, microseconds=n)
    if usage is None:
        prompt = 10 + (n * 7919) % 5000
        completion = 0 if model == "minilm" else (n * 104729) % 700
        usage = (prompt, (n * 31) % (prompt + 1), completion)
    version = BOOK.price_at(model, when)
    tier = list(CacheTier)[n % len(CacheTier)]
    gpu_ms = None if n % 3 else n * 0.1
    # Engine time on a priced device, an unpriced one, or one that named no rate.
    device = None if gpu_ms is None else ("cuda", "cpu", None)[n % 9 // 3]
    hour_usd = {"cuda": Decimal("2.49"), "cpu": Decimal("0")}.get(device or "")
    device_usd = device_cost(gpu_ms, hour_usd)
    return UsageEvent(
        id=f"req-{n:06d}",
        occurred_at=when,
        tenant_id=("t-1", "t-2", "t-gone")[n % 3 if n % 7 else 2],
        key_id=None if n % 5 == 0 else f"key-{n % 4}",
        model=model,
        operation="embeddings" if model == "minilm" else "chat.completions",
        prompt_tokens=usage[0],
        cached_tokens=usage[1],
        completion_tokens=usage[2],
        cache_tier=tier,
        status=list(EventStatus)[n % len(EventStatus)],
        latency_ms=12.5 + n / 3,
        ttft_ms=None if n % 2 else 3.25,
        gpu_ms=gpu_ms,
        device=device,
        device_hour_usd=hour_usd,
        device_cost_usd=device_usd,
        cost_usd=rate(version, *usage, tier) + device_usd,
        price_id=None if version is None else version.id,
    )


def events(count: int) -> Iterator[UsageEvent]:
    return (make_event(n) for n in range(count))


def run(
    fmt: str,
    items: Iterator[UsageEvent] | list[UsageEvent],
    *,
    batch_size: int = 10_000,
    billing_period: tuple[datetime, datetime] | None = None,
) -> list[bytes]:
    stream = export(
        items,
        fmt,
        tenant_names=TENANTS,
        prices=BOOK.by_id,
        billing_period=billing_period,
        batch_size=batch_size,
    )
    return list(stream)


def read_csv(data: bytes) -> tuple[list[str], list[dict[str, str]]]:
    reader = csv.DictReader(io.StringIO(data.decode(), newline=""))
    return list(reader.fieldnames or []), list(reader)


def event_from_text(row: dict[str, str]) -> UsageEvent:
    """A csv row back as an event: an empty cell is a missing value."""
    return msgspec.convert(
        {name: None if value == "" else value for name, value in row.items()},
        UsageEvent,
        strict=False,
    )


def total_cost(items: list[UsageEvent]) -> Decimal:
    return sum((e.cost_usd for e in items), Decimal(0))


events_strategy = st.lists(
    st.builds(
        make_event,
        st.integers(0, 10_000),
        when=st.datetimes(
            min_value=datetime(2026, 1, 1),
            max_value=datetime(2026, 12, 31),
            timezones=st.sampled_from([UTC, timezone(timedelta(hours=-7))]),
        ),
        usage=st.integers(0, 10**6).flatmap(
            lambda prompt: st.tuples(st.just(prompt), st.integers(0, prompt), st.integers(0, 10**6))
        ),
    ),
    max_size=12,
)


def test_event_columns_are_the_event_fields() -> None:
    assert tuple(f.name for f in msgspec.structs.fields(UsageEvent)) == EVENT_COLUMNS


def test_csv_reads_back_to_the_same_events() -> None:
    items = list(events(500))
    header, rows = read_csv(b"".join(run("csv", items, batch_size=64)))
    assert header == list(EVENT_COLUMNS)
    assert len(rows) == len(items)
    assert [event_from_text(r) for r in rows] == items
    assert sum(Decimal(r["cost_usd"]) for r in rows) == total_cost(items)
    assert rows[1]["occurred_at"] == "2026-03-01T00:37:00.000001Z"


def test_jsonl_reads_back_to_the_same_events() -> None:
    items = list(events(500))
    lines = b"".join(run("jsonl", items, batch_size=64)).splitlines()
    assert len(lines) == len(items)
    records = [json.loads(line) for line in lines]
    assert all(list(r) == list(EVENT_COLUMNS) for r in records)
    assert all(isinstance(r["cost_usd"], str) for r in records)
    assert sum(Decimal(r["cost_usd"]) for r in records) == total_cost(items)
    assert [msgspec.json.decode(line, type=UsageEvent) for line in lines] == items


def test_parquet_reads_back_with_exact_decimals() -> None:
    items = list(events(500))
    data = b"".join(run("parquet", items, batch_size=64))
    parquet = pq.ParquetFile(io.BytesIO(data))
    assert parquet.metadata.num_rows == len(items)
    assert parquet.metadata.num_row_groups == 8
    table = parquet.read()
    assert table.column_names == list(EVENT_COLUMNS)
    assert table.schema.field("cost_usd").type == pa.decimal128(38, 12)
    assert table.schema.field("occurred_at").type == pa.timestamp("us", tz="UTC")
    costs = table.column("cost_usd").to_pylist()
    assert sum(costs) == total_cost(items)
    assert costs == [e.cost_usd for e in items]
    assert [msgspec.convert(r, UsageEvent) for r in table.to_pylist()] == items


@PROPERTY
@given(events_strategy, st.integers(1, 5))
def test_every_format_keeps_the_cost_exact(items: list[UsageEvent], batch_size: int) -> None:
    expected = total_cost(items)
    _, rows = read_csv(b"".join(run("csv", items, batch_size=batch_size)))
    assert sum((Decimal(r["cost_usd"]) for r in rows), Decimal(0)) == expected
    lines = b"".join(run("jsonl", items, batch_size=batch_size)).splitlines()
    assert sum((Decimal(json.loads(x)["cost_usd"]) for x in lines), Decimal(0)) == expected
    table = pq.read_table(io.BytesIO(b"".join(run("parquet", items, batch_size=batch_size))))
    assert sum(table.column("cost_usd").to_pylist(), Decimal(0)) == expected
    _, focus = read_csv(b"".join(run("focus", items, batch_size=batch_size)))
    assert sum((Decimal(r["BilledCost"]) for r in focus), Decimal(0)) == expected
    assert len(rows) == len(lines) == table.num_rows == len(items)


def test_focus_rows_are_charges_per_token_class() -> None:
    items = list(events(600))
    header, rows = read_csv(b"".join(run("focus", items, batch_size=100)))
    assert header == list(FOCUS_COLUMNS)
    assert set(header) >= FOCUS_REQUIRED
    assert all(c.startswith("x_") for c in set(header) - FOCUS_REQUIRED - {"x_PriceId"})

    token_rows = {
        e.id: sum(
            1
            for q in quantities(
                e.prompt_tokens, e.cached_tokens, e.completion_tokens, e.cache_tier
            ).values()
            if q
        )
        for e in items
    }
    # Each event's engine time is one more row, in device-seconds, priced per device-hour
    # at the rate of its device.
    device = [r for r in rows if r["x_TokenClass"] == "device_time"]
    by_id = {e.id: e for e in items}
    assert {r["x_RequestId"] for r in device} == {e.id for e in items if e.gpu_ms}
    for r in device:
        assert Decimal(r["ConsumedQuantity"]) * 1000 == Decimal(
            repr(by_id[r["x_RequestId"]].gpu_ms)
        )
        event = by_id[r["x_RequestId"]]
        assert (r["ConsumedUnit"], r["PricingUnit"]) == ("Device-Seconds", "Device-Hours")
        assert Decimal(r["BilledCost"]) == event.device_cost_usd
        assert r["BilledCost"] == r["EffectiveCost"] == r["ListCost"] == r["ContractedCost"]
        assert Decimal(r["ListUnitPrice"]) == (event.device_hour_usd or 0)
        hours = Decimal(r["PricingQuantity"])
        assert abs(hours * 3_600_000 - Decimal(repr(event.gpu_ms))) < Decimal("1e-5")
        assert abs(hours * Decimal(r["ListUnitPrice"]) - event.device_cost_usd) < Decimal("1e-11")
        assert r["x_Device"] == (event.device or "")
    device_billed = {r["x_RequestId"]: Decimal(r["BilledCost"]) for r in device}
    assert any(device_billed.values())
    rows = [r for r in rows if r["x_TokenClass"] != "device_time"]
    assert len(rows) == sum(token_rows.values())
    billed: dict[str, Decimal] = {}
    for r in rows:
        billed[r["x_RequestId"]] = billed.get(r["x_RequestId"], Decimal(0)) + Decimal(
            r["BilledCost"]
        )
        assert r["BilledCost"] == r["EffectiveCost"] == r["ListCost"] == r["ContractedCost"]
        assert Decimal(r["ListUnitPrice"]) * int(r["PricingQuantity"]) == Decimal(r["BilledCost"])
        assert r["ConsumedQuantity"] == r["PricingQuantity"] != "0"
        assert "E" not in r["BilledCost"]
        assert "E" not in r["ListUnitPrice"]
        for column in (
            "BillingPeriodStart",
            "BillingPeriodEnd",
            "ChargePeriodStart",
            "ChargePeriodEnd",
        ):
            assert FOCUS_INSTANT.fullmatch(r[column]), r[column]
        assert (
            r["BillingPeriodStart"]
            <= r["ChargePeriodStart"]
            < r["ChargePeriodEnd"]
            <= r["BillingPeriodEnd"]
        )
        assert r["BillingCurrency"] == "USD"
        assert r["ChargeCategory"] == "Usage"
        assert r["ChargeClass"] == ""
        assert r["ChargeFrequency"] == "Usage-Based"
        assert r["ConsumedUnit"] == "Tokens"
        assert r["PricingCategory"] == "Standard"
        assert r["ServiceName"] == r["ProviderName"] == r["PublisherName"] == "Tollgate"
        assert r["InvoiceIssuerName"] == "Tollgate"
        assert r["ServiceCategory"] == "AI and Machine Learning"
        assert r["ResourceId"] == r["ResourceName"]
        assert r["SubAccountId"] == r["BillingAccountId"]
        assert r["SubAccountName"] == TENANTS.get(r["SubAccountId"], r["SubAccountId"])
        assert r["x_TokenClass"] in {c.value for c in TokenClass}
    by_id = {e.id: e for e in items}
    # Every event with tokens has rows, and its rows add up to its cost exactly.
    for request_id, amount in device_billed.items():
        billed[request_id] += amount
    assert billed == {e.id: e.cost_usd for e in items if e.prompt_tokens or e.completion_tokens}
    assert all(by_id[i].cost_usd == c for i, c in billed.items())


def test_focus_row_contents() -> None:
    when = datetime(2026, 5, 31, 23, 59, 59, 999_999, tzinfo=UTC)
    item = make_event(1, when=when, model="demo-chat", usage=(1000, 400, 0))
    _, rows = read_csv(b"".join(run("focus", [item])))
    assert [r["x_TokenClass"] for r in rows] == ["input", "cached_input"]
    first = rows[0]
    assert first["ChargeDescription"] == "demo-chat input tokens"
    assert first["BilledCost"] == "0.00012"
    assert first["ListUnitPrice"] == "0.0000002"
    assert first["x_PriceId"] == "2"
    assert first["SubAccountName"] == 'The "Quoted" Co'
    assert first["BillingPeriodStart"] == "2026-05-01T00:00:00Z"
    assert first["BillingPeriodEnd"] == "2026-06-01T00:00:00Z"
    assert first["ChargePeriodStart"] == "2026-05-31T23:00:00Z"
    assert first["ChargePeriodEnd"] == "2026-06-01T00:00:00Z"
    assert sum(Decimal(r["BilledCost"]) for r in rows) == item.cost_usd


def test_focus_without_a_price_bills_zero() -> None:
    item = make_event(3, model="unpriced", usage=(10, 0, 5))
    assert item.price_id is None
    _, rows = read_csv(b"".join(run("focus", [item])))
    assert [
        (r["x_TokenClass"], r["BilledCost"], r["ListUnitPrice"], r["x_PriceId"]) for r in rows
    ] == [
        ("input", "0", "0", ""),
        ("output", "0", "0", ""),
        ("device_time", "0", "0", ""),
    ]


def test_focus_uses_the_given_billing_period() -> None:
    start, end = datetime(2026, 3, 1, 0, 30, tzinfo=UTC), datetime(2026, 3, 2, tzinfo=UTC)
    item = make_event(1, when=start + timedelta(minutes=5), model="demo-chat", usage=(10, 0, 5))
    _, rows = read_csv(b"".join(run("focus", [item], billing_period=(start, end))))
    assert {(r["BillingPeriodStart"], r["BillingPeriodEnd"]) for r in rows} == {
        ("2026-03-01T00:30:00Z", "2026-03-02T00:00:00Z")
    }
    # The charge hour is clipped to the billing period.
    assert {(r["ChargePeriodStart"], r["ChargePeriodEnd"]) for r in rows} == {
        ("2026-03-01T00:30:00Z", "2026-03-01T01:00:00Z")
    }
    late = make_event(1, when=end, model="demo-chat", usage=(10, 0, 5))
    with pytest.raises(ExportError, match="outside the billing period"):
        run("focus", [late], billing_period=(start, end))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"cost_usd": Decimal("0.5")}, "differs"),
        ({"price_id": 99}, "unknown price 99"),
        ({"price_id": 3}, "refers to price 3 of 'minilm'"),
        ({"price_id": None}, "differs"),
        ({"occurred_at": datetime(2026, 3, 5)}, "timezone-aware"),
    ],
)
def test_focus_refuses_events_it_cannot_state_faithfully(
    change: dict[str, object], message: str
) -> None:
    item = msgspec.structs.replace(make_event(4, model="demo-chat", usage=(10, 0, 5)), **change)
    with pytest.raises(ExportError, match=message):
        run("focus", [item])


def test_tiny_amounts_print_without_exponent() -> None:
    item = make_event(3, model="minilm", usage=(3, 0, 0))
    assert item.cost_usd == Decimal("6E-8")
    _, rows = read_csv(b"".join(run("csv", [item])))
    assert rows[0]["cost_usd"] == "0.00000006"
    _, focus = read_csv(b"".join(run("focus", [item])))
    assert focus[0]["BilledCost"] == "0.00000006"
    assert json.loads(b"".join(run("jsonl", [item])))["cost_usd"] == "0.00000006"


def test_parquet_refuses_costs_finer_than_its_column() -> None:
    item = msgspec.structs.replace(make_event(1), cost_usd=Decimal("1E-13"))
    with pytest.raises(ExportError, match="1e-12"):
        run("parquet", [item])


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_large_export_streams_in_chunks(fmt: str) -> None:
    pulled = 0

    def source() -> Iterator[UsageEvent]:
        nonlocal pulled
        for item in events(25_000):
            pulled += 1
            yield item

    stream = export(source(), fmt, tenant_names=TENANTS, prices=BOOK.by_id)
    assert pulled == 0
    first = next(stream)
    assert first
    assert pulled == 10_000
    chunks = [first, *stream]
    assert pulled == 25_000
    assert len(chunks) >= 3
    data = b"".join(chunks)
    if fmt == "parquet":
        parquet = pq.ParquetFile(io.BytesIO(data))
        assert parquet.metadata.num_rows == 25_000
        assert parquet.metadata.num_row_groups == 3
    elif fmt == "jsonl":
        assert data.count(b"\n") == 25_000
    elif fmt == "csv":
        assert len(read_csv(data)[1]) == 25_000


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_empty_export_is_a_valid_empty_file(fmt: str) -> None:
    data = b"".join(run(fmt, []))
    if fmt == "parquet":
        table = pq.read_table(io.BytesIO(data))
        assert table.num_rows == 0
        assert table.column_names == list(EVENT_COLUMNS)
    elif fmt == "jsonl":
        assert data == b""
    else:
        header, rows = read_csv(data)
        assert rows == []
        assert header == list(FOCUS_COLUMNS if fmt == "focus" else EVENT_COLUMNS)


def test_bad_arguments_fail_before_reading() -> None:
    def never() -> Iterator[UsageEvent]:
        raise AssertionError("read")
        yield  # pragma: no cover

    with pytest.raises(ValueError, match="unknown export format"):
        export(never(), "xml", tenant_names={}, prices={})
    with pytest.raises(ValueError, match="batch_size"):
        export(never(), "csv", tenant_names={}, prices={}, batch_size=0)
    naive = (datetime(2026, 3, 1), datetime(2026, 4, 1))
    with pytest.raises(ValueError, match="timezone-aware"):
        export(never(), "focus", tenant_names={}, prices={}, billing_period=naive)
    backwards = (T0, T0 - timedelta(days=1))
    with pytest.raises(ValueError, match="end after"):
        export(never(), "focus", tenant_names={}, prices={}, billing_period=backwards)
    fractional = (T0 + timedelta(microseconds=5), T0 + timedelta(days=1))
    with pytest.raises(ValueError, match="whole seconds"):
        export(never(), "focus", tenant_names={}, prices={}, billing_period=fractional)


def test_media_types_and_file_names() -> None:
    assert media_type("csv") == "text/csv; charset=utf-8"
    assert media_type("focus") == "text/csv; charset=utf-8"
    assert media_type("jsonl") == "application/x-ndjson"
    assert media_type("parquet") == "application/vnd.apache.parquet"
    start, end = datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC)
    assert filename("focus", start, end, "acme") == "tollgate-focus-acme-20261101-20261201.csv"
    assert filename("parquet", start, end) == "tollgate-usage-all-20261101-20261201.parquet"
    assert filename("jsonl", start, end + timedelta(hours=1, seconds=2), 'a"b/../c\r\n') == (
        "tollgate-usage-a_b_.._c__-20261101-20261201T010002Z.jsonl"
    )
    with pytest.raises(ValueError, match="unknown export format"):
        media_type("xlsx")
    with pytest.raises(ValueError, match="unknown export format"):
        filename("xlsx", start, end)
