"""Streamed finance exports of usage events: CSV, JSON Lines, Parquet and FOCUS 1.0 CSV.

:func:`export` reads the events lazily and yields the file in chunks, one per batch of
events, so an export of any size holds one batch in memory.

- ``csv``, ``jsonl``, ``parquet``: one row per event, one column per :class:`UsageEvent`
  field, in field order (:data:`EVENT_COLUMNS`). Instants are ISO 8601 UTC with microseconds
  and a ``Z`` (a UTC timestamp column in Parquet); money is an exact decimal string without
  exponent (a ``decimal128(38, 12)`` column in Parquet, exact because every cost is a
  multiple of ``1e-12`` USD); a missing value is an empty cell, ``null`` or a null.
- ``focus``: FinOps FOCUS 1.0 columns (:data:`FOCUS_COLUMNS`) as CSV, one ``Usage`` row per
  event and token class with a non-zero quantity. BilledCost, EffectiveCost, ListCost and
  ContractedCost are the class's exact amount; the rows of one event add up to its
  ``cost_usd`` exactly. Prices are per token (PricingUnit ``Tokens``). The billing period is
  the event's calendar month (UTC) unless one is given; the charge period is the UTC hour
  containing the event (clipped to the billing period), which keeps every date/time in the
  whole-second ``YYYY-MM-DDTHH:mm:ssZ`` form that FOCUS requires.

Errors: ``ValueError`` for an unknown format or bad arguments (raised by :func:`export`
itself, before anything is read), :class:`ExportError` (a ``ValueError``) while streaming when
an event cannot be written faithfully.
"""

from __future__ import annotations

import csv
import decimal
import enum
import io
import itertools
import re
from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import msgspec
import pyarrow as pa
import pyarrow.parquet as pq

from billing.events import UsageEvent
from billing.invoices import period_bounds, period_of
from billing.pricing import (
    EXACT_CONTEXT,
    Price,
    TokenClass,
    class_amounts,
    device_hours,
    quantities,
)

__all__ = [
    "EVENT_COLUMNS",
    "FOCUS_COLUMNS",
    "FORMATS",
    "ExportError",
    "export",
    "filename",
    "media_type",
]

FORMATS = ("csv", "jsonl", "parquet", "focus")

#: The columns of the csv, jsonl and parquet exports: every usage event field, in order.
EVENT_COLUMNS: tuple[str, ...] = tuple(field.name for field in msgspec.structs.fields(UsageEvent))

#: The columns of the FOCUS export: FOCUS 1.0 columns, then Tollgate's own ``x_`` columns.
FOCUS_COLUMNS = (
    "BilledCost",
    "BillingAccountId",
    "BillingAccountName",
    "BillingCurrency",
    "BillingPeriodEnd",
    "BillingPeriodStart",
    "ChargeCategory",
    "ChargeClass",
    "ChargeDescription",
    "ChargeFrequency",
    "ChargePeriodEnd",
    "ChargePeriodStart",
    "ConsumedQuantity",
    "ConsumedUnit",
    "ContractedCost",
    "ContractedUnitPrice",
    "EffectiveCost",
    "InvoiceIssuerName",
    "ListCost",
    "ListUnitPrice",
    "PricingCategory",
    "PricingQuantity",
    "PricingUnit",
    "ProviderName",
    "PublisherName",
    "ResourceId",
    "ResourceName",
    "ServiceCategory",
    "ServiceName",
    "SubAccountId",
    "SubAccountName",
    "x_RequestId",
    "x_TokenClass",
    "x_KeyId",
    "x_Operation",
    "x_PriceId",
    "x_Device",
)

_MEDIA_TYPES = {
    "csv": "text/csv; charset=utf-8",
    "jsonl": "application/x-ndjson",
    "parquet": "application/vnd.apache.parquet",
    "focus": "text/csv; charset=utf-8",
}
_EXTENSIONS = {"csv": "csv", "jsonl": "jsonl", "parquet": "parquet", "focus": "csv"}

#: Parquet column types by event field; a field missing here fails the export test.
_ARROW_TYPES: dict[str, pa.DataType] = {
    "id": pa.string(),
    "occurred_at": pa.timestamp("us", tz="UTC"),
    "tenant_id": pa.string(),
    "key_id": pa.string(),
    "model": pa.string(),
    "operation": pa.string(),
    "prompt_tokens": pa.int64(),
    "cached_tokens": pa.int64(),
    "completion_tokens": pa.int64(),
    "cache_tier": pa.string(),
    "status": pa.string(),
    "latency_ms": pa.float64(),
    "ttft_ms": pa.float64(),
    "gpu_ms": pa.float64(),
    "device": pa.string(),
    "device_hour_usd": pa.decimal128(18, 6),
    "device_cost_usd": pa.decimal128(38, 12),
    "cost_usd": pa.decimal128(38, 12),
    "price_id": pa.int64(),
}
_MONEY_QUANTUM = Decimal(1).scaleb(-12)
_PROVIDER = "Tollgate"
_CLASS_WORDS = {
    TokenClass.INPUT: "input",
    TokenClass.CACHED_INPUT: "cached input",
    TokenClass.OUTPUT: "output",
    TokenClass.RESPONSE_INPUT: "response-cache input",
    TokenClass.RESPONSE_OUTPUT: "response-cache output",
}
_HOUR = timedelta(hours=1)


class ExportError(ValueError):
    """An event that cannot be exported faithfully; the export stops (not recoverable by retry).

    For example an event whose ``price_id`` is unknown, or whose ``cost_usd`` differs from
    what its price gives for its tokens.
    """


def media_type(fmt: str) -> str:
    """The HTTP media type of an export format.

    Raises:
        ValueError: ``fmt`` is not one of :data:`FORMATS`.
    """
    return _MEDIA_TYPES[_check_format(fmt)]


def filename(fmt: str, start: datetime, end: datetime, tenant: str | None = None) -> str:
    """A download file name such as ``tollgate-focus-acme-20261101-20261201.csv``.

    Instants print as ``YYYYMMDD`` at midnight UTC and ``YYYYMMDDTHHMMSSZ`` otherwise; the
    tenant (``all`` when ``None``) keeps only letters, digits, ``.``, ``_`` and ``-``.

    Raises:
        ValueError: an unknown format or a naive instant.
    """
    kind = "focus" if _check_format(fmt) == "focus" else "usage"
    who = "all" if tenant is None else re.sub(r"[^A-Za-z0-9._-]", "_", tenant, flags=re.ASCII)
    return f"tollgate-{kind}-{who}-{_stamp(start)}-{_stamp(end)}.{_EXTENSIONS[fmt]}"


def export(
    events: Iterable[UsageEvent],
    fmt: str,
    *,
    tenant_names: Mapping[str, str],
    prices: Mapping[int, Price],
    billing_period: tuple[datetime, datetime] | None = None,
    batch_size: int = 10_000,
) -> Iterator[bytes]:
    """Stream ``events`` as a file of format ``fmt``, one chunk per batch of events.

    The arguments are checked at once; the events are read only as the chunks are consumed.

    Args:
        events: The events to export, in the order they should appear.
        fmt: One of :data:`FORMATS`.
        tenant_names: Display names by tenant id (FOCUS SubAccountName; a tenant missing here
            is named by its id).
        prices: Every price version the events refer to, by id (FOCUS unit prices).
        billing_period: FOCUS billing period (start inclusive, end exclusive, whole seconds,
            timezone-aware); every event must fall inside it. Default: each event's month.
        batch_size: Events per chunk (and per Parquet row group).

    Raises:
        ValueError: an unknown format, a batch size below 1 or an invalid billing period.
        ExportError: while streaming, an event that cannot be exported faithfully.
    """
    _check_format(fmt)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if billing_period is not None:
        _check_billing_period(billing_period)
    batches = _batches(events, batch_size)
    if fmt == "csv":
        return _csv_events(batches)
    if fmt == "jsonl":
        return _jsonl_events(batches)
    if fmt == "parquet":
        return _parquet_events(batches)
    return _focus(batches, tenant_names, prices, billing_period)


def _check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; expected one of {', '.join(FORMATS)}")
    return fmt


def _check_billing_period(period: tuple[datetime, datetime]) -> None:
    start, end = period
    if start.utcoffset() is None or end.utcoffset() is None:
        raise ValueError("billing_period needs timezone-aware instants")
    if start.microsecond or end.microsecond:
        raise ValueError("billing_period must be whole seconds (FOCUS date/time format)")
    if not start < end:
        raise ValueError("billing_period must end after it starts")


def _stamp(when: datetime) -> str:
    utc = _utc(when)
    if utc == utc.replace(hour=0, minute=0, second=0, microsecond=0):
        return utc.strftime("%Y%m%d")
    return utc.strftime("%Y%m%dT%H%M%SZ")


def _batches(events: Iterable[UsageEvent], size: int) -> Iterator[list[UsageEvent]]:
    iterator = iter(events)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def _utc(when: datetime) -> datetime:
    if when.utcoffset() is None:
        raise ExportError(f"naive instant {when.isoformat()}: instants must be timezone-aware")
    return when.astimezone(UTC)


def _instant_text(when: datetime) -> str:
    """An event instant: ISO 8601 UTC with microseconds and ``Z``."""
    return _utc(when).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _focus_instant(when: datetime) -> str:
    """A FOCUS date/time: ``YYYY-MM-DDTHH:mm:ssZ``."""
    return _utc(when).strftime("%Y-%m-%dT%H:%M:%SZ")


def _money(amount: Decimal) -> str:
    """An exact decimal string without exponent or trailing zeros (``0.0000001``, ``120``)."""
    if not amount:
        return "0"
    return f"{amount.normalize(EXACT_CONTEXT):f}"


def _json_value(value: object) -> object:
    if isinstance(value, datetime):
        return _instant_text(value)
    if isinstance(value, Decimal):
        return _money(value)
    if isinstance(value, enum.Enum):
        return value.value
    return value


def _text_value(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(_json_value(value))


def _csv_rows(rows: Iterator[list[list[str]]], header: tuple[str, ...]) -> Iterator[bytes]:
    """CSV with a header, one chunk per list of rows (the header alone when there are none)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    for batch in rows:
        writer.writerows(batch)
        if buffer.tell():
            yield buffer.getvalue().encode()
            buffer.seek(0)
            buffer.truncate()
    if buffer.tell():
        yield buffer.getvalue().encode()


def _csv_events(batches: Iterator[list[UsageEvent]]) -> Iterator[bytes]:
    rows = (
        [[_text_value(getattr(event, name)) for name in EVENT_COLUMNS] for event in batch]
        for batch in batches
    )
    return _csv_rows(rows, EVENT_COLUMNS)


def _jsonl_events(batches: Iterator[list[UsageEvent]]) -> Iterator[bytes]:
    encoder = msgspec.json.Encoder()
    for batch in batches:
        lines = bytearray()
        for event in batch:
            record = {name: _json_value(getattr(event, name)) for name in EVENT_COLUMNS}
            encoder.encode_into(record, lines, len(lines))
            lines += b"\n"
        yield bytes(lines)


class _Sink:
    """A write-only file that hands over what was written since the last :meth:`drain`.

    ``tell`` counts every byte ever written, so the Parquet footer's offsets stay right.
    """

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._written = 0
        self.closed = False

    def write(self, data: bytes) -> int:
        self._parts.append(bytes(data))
        self._written += len(data)
        return len(data)

    def tell(self) -> int:
        return self._written

    def flush(self) -> None:
        """Nothing is buffered here."""

    def close(self) -> None:
        self.closed = True

    def writable(self) -> bool:
        return True

    def drain(self) -> bytes:
        data = b"".join(self._parts)
        self._parts.clear()
        return data


def _parquet_value(value: object) -> object:
    if isinstance(value, datetime):
        return _utc(value)
    if isinstance(value, Decimal):
        return _twelve_decimals(value)
    if isinstance(value, enum.Enum):
        return value.value
    return value


def _twelve_decimals(amount: Decimal) -> Decimal:
    try:
        with decimal.localcontext(EXACT_CONTEXT):
            return amount.quantize(_MONEY_QUANTUM)
    except (decimal.Inexact, decimal.InvalidOperation) as error:
        raise ExportError(f"{amount} USD is not a whole number of 1e-12 USD") from error


def _parquet_events(batches: Iterator[list[UsageEvent]]) -> Iterator[bytes]:
    schema = pa.schema([pa.field(name, _ARROW_TYPES[name]) for name in EVENT_COLUMNS])
    sink = _Sink()
    with pq.ParquetWriter(sink, schema) as writer:
        for batch in batches:
            columns = {
                name: [_parquet_value(getattr(event, name)) for event in batch]
                for name in EVENT_COLUMNS
            }
            writer.write_table(pa.table(columns, schema=schema), row_group_size=len(batch))
            if chunk := sink.drain():
                yield chunk
    yield sink.drain()


def _focus(
    batches: Iterator[list[UsageEvent]],
    tenant_names: Mapping[str, str],
    prices: Mapping[int, Price],
    billing_period: tuple[datetime, datetime] | None,
) -> Iterator[bytes]:
    rows = (
        [row for event in batch for row in _focus_rows(event, tenant_names, prices, billing_period)]
        for batch in batches
    )
    return _csv_rows(rows, FOCUS_COLUMNS)


def _focus_rows(
    event: UsageEvent,
    tenant_names: Mapping[str, str],
    prices: Mapping[int, Price],
    billing_period: tuple[datetime, datetime] | None,
) -> list[list[str]]:
    price = _event_price(event, prices)
    amounts = class_amounts(
        price, event.prompt_tokens, event.cached_tokens, event.completion_tokens, event.cache_tier
    )
    with decimal.localcontext(EXACT_CONTEXT):
        total = sum(amounts.values(), Decimal(0))
        total += event.device_cost_usd
    if total != event.cost_usd:
        raise ExportError(
            f"event {event.id}: cost_usd {_money(event.cost_usd)} differs from "
            f"{_money(total)} given by price {event.price_id} for its tokens and its "
            "device time"
        )
    occurred_at = _utc(event.occurred_at)
    period_start, period_end = billing_period or period_bounds(period_of(occurred_at))
    if not period_start <= occurred_at < period_end:
        raise ExportError(
            f"event {event.id} at {_instant_text(occurred_at)} is outside the billing period"
        )
    hour = occurred_at.replace(minute=0, second=0, microsecond=0)
    charge_start = max(hour, period_start)
    charge_end = min(hour + _HOUR, period_end)
    tenant_name = tenant_names.get(event.tenant_id, event.tenant_id)
    common = {
        "BillingAccountId": event.tenant_id,
        "BillingAccountName": tenant_name,
        "BillingCurrency": "USD",
        "BillingPeriodEnd": _focus_instant(period_end),
        "BillingPeriodStart": _focus_instant(period_start),
        "ChargeCategory": "Usage",
        "ChargeClass": "",
        "ChargeFrequency": "Usage-Based",
        "ChargePeriodEnd": _focus_instant(charge_end),
        "ChargePeriodStart": _focus_instant(charge_start),
        "InvoiceIssuerName": _PROVIDER,
        "PricingCategory": "Standard",
        "ProviderName": _PROVIDER,
        "PublisherName": _PROVIDER,
        "ResourceId": event.model,
        "ResourceName": event.model,
        "ServiceCategory": "AI and Machine Learning",
        "ServiceName": _PROVIDER,
        "SubAccountId": event.tenant_id,
        "SubAccountName": tenant_name,
        "x_RequestId": event.id,
        "x_KeyId": _text_value(event.key_id),
        "x_Operation": event.operation,
        "x_PriceId": _text_value(event.price_id),
        "x_Device": _text_value(event.device),
    }
    rows: list[list[str]] = []
    for token_class, quantity in quantities(
        event.prompt_tokens, event.cached_tokens, event.completion_tokens, event.cache_tier
    ).items():
        if quantity == 0:
            continue
        amount = _money(amounts[token_class])
        unit_price = _money(_per_token(price, token_class))
        values = {
            **common,
            "BilledCost": amount,
            "ChargeDescription": f"{event.model} {_CLASS_WORDS[token_class]} tokens",
            "ConsumedQuantity": str(quantity),
            "ConsumedUnit": "Tokens",
            "ContractedCost": amount,
            "ContractedUnitPrice": unit_price,
            "EffectiveCost": amount,
            "ListCost": amount,
            "ListUnitPrice": unit_price,
            "PricingQuantity": str(quantity),
            "PricingUnit": "Tokens",
            "x_TokenClass": token_class.value,
        }
        rows.append([values[column] for column in FOCUS_COLUMNS])
    if event.gpu_ms:
        # The engine time the request took (a row of its own, with or without tokens),
        # consumed in device-seconds and priced per device-hour at the rate of the device
        # that served it.
        amount = _money(event.device_cost_usd)
        unit_price = _money(event.device_hour_usd or Decimal(0))
        on = f" on {event.device}" if event.device else ""
        hours = _money(device_hours(event.gpu_ms))
        values = {
            **common,
            "BilledCost": amount,
            "ChargeDescription": f"{event.model} device time{on}",
            "ConsumedQuantity": _money(Decimal(repr(event.gpu_ms)).scaleb(-3)),
            "ConsumedUnit": "Device-Seconds",
            "ContractedCost": amount,
            "ContractedUnitPrice": unit_price,
            "EffectiveCost": amount,
            "ListCost": amount,
            "ListUnitPrice": unit_price,
            "PricingQuantity": hours,
            "PricingUnit": "Device-Hours",
            "x_TokenClass": "device_time",
        }
        rows.append([values[column] for column in FOCUS_COLUMNS])
    return rows


def _per_token(price: Price | None, token_class: TokenClass) -> Decimal:
    if price is None:
        return Decimal(0)
    with decimal.localcontext(EXACT_CONTEXT):
        return price.per_mtok(token_class).scaleb(-6)


def _event_price(event: UsageEvent, prices: Mapping[int, Price]) -> Price | None:
    if event.price_id is None:
        return None
    price = prices.get(event.price_id)
    if price is None:
        raise ExportError(f"event {event.id} refers to unknown price {event.price_id}")
    if price.model != event.model:
        raise ExportError(
            f"event {event.id} for {event.model!r} refers to price {price.id} of {price.model!r}"
        )
    return price
