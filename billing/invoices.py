"""Monthly invoices: one line per model, token class and unit price, and one per model,
device kind and device rate for engine time, each rounded once.

The ledger hands over :class:`InvoiceRow` aggregates with exact amounts (the sum of the
events' exact costs); :func:`build_invoice` merges them into line items and rounds each line
to cents once, with the largest-remainder method, so that the lines add up to the exact
total rounded half-even to cents: the invoice total is the sum of the events to the last
cent, and no line is off from its exact amount by a cent or more.

Errors: ``ValueError`` for a malformed period or a non-finite amount.
"""

from __future__ import annotations

import decimal
import re
from collections.abc import Iterable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import msgspec

from billing.pricing import EXACT_CONTEXT, TokenClass

__all__ = [
    "DeviceLine",
    "DeviceRow",
    "Invoice",
    "InvoiceRow",
    "LineItem",
    "build_invoice",
    "invoice_to_dict",
    "period_bounds",
    "period_of",
]

_PERIOD = re.compile(r"([0-9]{4})-([0-9]{2})")
_CENT_EXPONENT = 2
_CLASS_ORDER = {cls: index for index, cls in enumerate(TokenClass)}
_CLASS_WORDS = {
    TokenClass.INPUT: "input",
    TokenClass.CACHED_INPUT: "cached input",
    TokenClass.OUTPUT: "output",
    TokenClass.RESPONSE_INPUT: "response-cache input",
    TokenClass.RESPONSE_OUTPUT: "response-cache output",
}


class InvoiceRow(msgspec.Struct, frozen=True, kw_only=True):
    """A ledger aggregate: one tenant's usage of one model, class and price in a period."""

    model: str
    token_class: TokenClass
    #: The price version; ``None`` for usage of a model that had no price.
    price_id: int | None
    #: USD per million tokens of ``token_class`` under that version (zero without a price).
    unit_price: Decimal
    #: Tokens of ``token_class``.
    quantity: int
    #: Exact sum of the events' cost for this class (not rounded).
    amount: Decimal


class LineItem(msgspec.Struct, frozen=True, kw_only=True):
    """One invoice line, rounded to cents."""

    model: str
    token_class: TokenClass
    unit_price_per_mtok: Decimal
    quantity: int
    amount_usd: Decimal
    description: str


class DeviceRow(msgspec.Struct, frozen=True, kw_only=True):
    """A ledger aggregate: one tenant's engine time on one model, device kind and rate."""

    model: str
    #: The device kind (``cpu``, ``cuda``, ...); ``None`` where it was not named.
    device: str | None
    #: USD per device-hour (zero where the device declared none).
    hour_usd: Decimal
    requests: int
    gpu_ms: float
    #: Exact sum of the events' device costs (not rounded).
    amount: Decimal


class DeviceLine(msgspec.Struct, frozen=True, kw_only=True):
    """One invoice line of engine time, rounded to cents."""

    model: str
    device: str | None
    unit_price_per_hour: Decimal
    #: Device-seconds.
    seconds: float
    amount_usd: Decimal
    description: str


class Invoice(msgspec.Struct, frozen=True, kw_only=True):
    """A tenant's invoice for one calendar month (UTC)."""

    tenant_id: str
    tenant_name: str
    #: ``YYYY-MM``.
    period: str
    #: First instant of the month, inclusive.
    period_start: datetime
    #: First instant of the next month, exclusive.
    period_end: datetime
    lines: list[LineItem]
    #: Sum of the lines, in cents; equals ``exact_total_usd`` rounded half-even to cents.
    total_usd: Decimal
    #: Sum of the exact amounts, not rounded.
    exact_total_usd: Decimal
    currency: str = "USD"
    #: Engine time per model in the period, in device-seconds (CPU seconds on a CPU engine).
    device_seconds: dict[str, float] = msgspec.field(default_factory=dict)
    #: Engine time per model, device kind and rate, priced at the rate of the device that
    #: served it; part of the totals.
    device_lines: list[DeviceLine] = msgspec.field(default_factory=list)


def period_bounds(period: str) -> tuple[datetime, datetime]:
    """The UTC start (inclusive) and end (exclusive) of a ``YYYY-MM`` period.

    Raises:
        ValueError: ``period`` is not a month written ``YYYY-MM`` between 0001-01 and 9999-11.
    """
    match = _PERIOD.fullmatch(period)
    if match is None:
        raise ValueError(f"period must be YYYY-MM, got {period!r}")
    year, month = int(match[1]), int(match[2])
    if not 1 <= month <= 12:
        raise ValueError(f"period {period!r} has no month {month}")
    if year < 1 or (year, month) >= (9999, 12):
        raise ValueError(f"period {period!r} is out of range")
    start = datetime(year, month, 1, tzinfo=UTC)
    end = datetime(year + month // 12, month % 12 + 1, 1, tzinfo=UTC)
    return start, end


def period_of(when: datetime) -> str:
    """The ``YYYY-MM`` period (UTC month) containing ``when``.

    Raises:
        ValueError: ``when`` is naive.
    """
    if when.utcoffset() is None:
        raise ValueError("a period is looked up for a timezone-aware instant")
    utc = when.astimezone(UTC)
    return f"{utc.year:04d}-{utc.month:02d}"


def build_invoice(
    tenant_id: str,
    tenant_name: str,
    period: str,
    rows: Iterable[InvoiceRow],
    device_ms: dict[str, float] | None = None,
    device_rows: Iterable[DeviceRow] = (),
) -> Invoice:
    """Merge the ledger rows into rounded line items.

    Rows of the same model, token class and unit price (of any price version) make one line;
    a line with zero quantity and zero amount is dropped. Lines are ordered by model, token
    class (input, cached input, output) and unit price.

    Args:
        tenant_id: The tenant billed.
        tenant_name: Its display name.
        period: The month, ``YYYY-MM``.
        rows: The ledger's aggregates for that tenant and month.
        device_ms: Engine milliseconds per model in the month (`Ledger.device_ms`).
        device_rows: Engine time per model, device and rate (`Ledger.device_rows`); rows of
            the same model, device and rate make one line, dropped when it is free.

    Raises:
        ValueError: ``period`` is malformed, or an amount or unit price is not finite.
    """
    start, end = period_bounds(period)
    merged: dict[tuple[str, TokenClass, Decimal], tuple[int, Decimal]] = {}
    with decimal.localcontext(EXACT_CONTEXT):
        for row in rows:
            if not row.amount.is_finite() or not row.unit_price.is_finite():
                raise ValueError(f"row for {row.model} {row.token_class} is not finite: {row}")
            key = (row.model, row.token_class, _canonical(row.unit_price))
            quantity, amount = merged.get(key, (0, Decimal(0)))
            merged[key] = (quantity + row.quantity, amount + row.amount)
        keys = sorted(
            (key for key, (quantity, amount) in merged.items() if quantity or amount),
            key=lambda k: (k[0], _CLASS_ORDER[k[1]], k[2]),
        )
        devices: dict[tuple[str, str, Decimal], tuple[float, Decimal]] = {}
        for device_row in device_rows:
            if not device_row.amount.is_finite() or not device_row.hour_usd.is_finite():
                raise ValueError(f"device row for {device_row.model} is not finite: {device_row}")
            device_key = (
                device_row.model,
                device_row.device or "",
                _canonical(device_row.hour_usd),
            )
            ms, amount = devices.get(device_key, (0.0, Decimal(0)))
            devices[device_key] = (ms + device_row.gpu_ms, amount + device_row.amount)
        device_keys = sorted(key for key, (_, amount) in devices.items() if amount)
        exact = [merged[key][1] for key in keys] + [devices[key][1] for key in device_keys]
        exact_total = sum(exact, Decimal(0))
        total_cents = _to_cents(exact_total, decimal.ROUND_HALF_EVEN)
        rounded = _round_lines(exact, total_cents)
    lines = [
        LineItem(
            model=model,
            token_class=token_class,
            unit_price_per_mtok=unit_price,
            quantity=merged[(model, token_class, unit_price)][0],
            amount_usd=amount,
            description=_describe(model, token_class, unit_price),
        )
        for (model, token_class, unit_price), amount in zip(keys, rounded[: len(keys)], strict=True)
    ]
    device_lines = [
        DeviceLine(
            model=model,
            device=device or None,
            unit_price_per_hour=hour_usd,
            seconds=round(devices[(model, device, hour_usd)][0] / 1000, 6),
            amount_usd=amount,
            description=f"{model} engine time on {device or 'an unnamed device'} "
            f"at ${hour_usd:f} per device-hour",
        )
        for (model, device, hour_usd), amount in zip(device_keys, rounded[len(keys) :], strict=True)
    ]
    return Invoice(
        tenant_id=tenant_id,
        tenant_name=tenant_name,
        period=period,
        period_start=start,
        period_end=end,
        lines=lines,
        total_usd=_cents(total_cents),
        exact_total_usd=exact_total,
        device_seconds={
            model: round(ms / 1000, 6) for model, ms in sorted((device_ms or {}).items()) if ms
        },
        device_lines=device_lines,
    )


def _round_lines(exact: list[Decimal], total_cents: int) -> list[Decimal]:
    """Round each amount to cents so that the cents add up to ``total_cents``.

    Every amount is floored, then the cents still missing go one each to the amounts with the
    largest remainders (the earlier line on a tie). The number missing is at most the count
    of amounts with a non-zero remainder, so each line stays within a cent of its amount.
    """
    floors = [_to_cents(amount, decimal.ROUND_FLOOR) for amount in exact]
    remainders = [
        amount.scaleb(_CENT_EXPONENT) - floor for amount, floor in zip(exact, floors, strict=True)
    ]
    missing = total_cents - sum(floors)
    if not 0 <= missing <= len(exact):
        raise ArithmeticError(f"{missing} cents to distribute over {len(exact)} lines")
    by_remainder = sorted(range(len(exact)), key=lambda i: (-remainders[i], i))
    for index in by_remainder[:missing]:
        floors[index] += 1
    return [_cents(cents) for cents in floors]


def _to_cents(amount: Decimal, rounding: str) -> int:
    return int(amount.scaleb(_CENT_EXPONENT).to_integral_value(rounding=rounding))


def _cents(cents: int) -> Decimal:
    return Decimal(cents).scaleb(-_CENT_EXPONENT)


def _canonical(value: Decimal) -> Decimal:
    """One spelling per value (``0.10`` and ``0.1`` are the same price): no trailing zeros."""
    normal = value.normalize()
    return normal.quantize(Decimal(1)) if normal == normal.to_integral_value() else normal


def _describe(model: str, token_class: TokenClass, unit_price: Decimal) -> str:
    return f"{model} {_CLASS_WORDS[token_class]} tokens at ${unit_price:f} per 1M tokens"


def _utc_text(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def invoice_to_dict(invoice: Invoice) -> dict[str, Any]:
    """The invoice as JSON-ready builtins: money as decimal strings, instants as ISO 8601 UTC."""
    return {
        "tenant_id": invoice.tenant_id,
        "tenant_name": invoice.tenant_name,
        "period": invoice.period,
        "period_start": _utc_text(invoice.period_start),
        "period_end": _utc_text(invoice.period_end),
        "currency": invoice.currency,
        "lines": [
            {
                "model": line.model,
                "token_class": line.token_class.value,
                "description": line.description,
                "unit_price_per_mtok": f"{line.unit_price_per_mtok:f}",
                "quantity": line.quantity,
                "amount_usd": f"{line.amount_usd:f}",
            }
            for line in invoice.lines
        ],
        "total_usd": f"{invoice.total_usd:f}",
        "exact_total_usd": f"{invoice.exact_total_usd:f}",
        "device_seconds": dict(invoice.device_seconds),
        "device_lines": [
            {
                "model": line.model,
                "device": line.device,
                "description": line.description,
                "unit_price_per_hour": f"{line.unit_price_per_hour:f}",
                "seconds": line.seconds,
                "amount_usd": f"{line.amount_usd:f}",
            }
            for line in invoice.device_lines
        ],
    }
