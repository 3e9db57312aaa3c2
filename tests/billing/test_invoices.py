"""Invoices: lines merged per model, class and unit price, rounded once to cents."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from decimal import ROUND_HALF_EVEN, Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from billing.invoices import InvoiceRow, build_invoice, invoice_to_dict, period_bounds, period_of
from billing.pricing import TokenClass

#: No example database: the tree is shared and ``.hypothesis/`` is not ignored by git.
PROPERTY = settings(database=None, deadline=None, max_examples=300)

CENT = Decimal("0.01")
CLASS_ORDER = list(TokenClass)

rows = st.builds(
    InvoiceRow,
    model=st.sampled_from(["demo-chat", "minilm", "qwen-0.5b"]),
    token_class=st.sampled_from(TokenClass),
    price_id=st.one_of(st.none(), st.integers(1, 5)),
    unit_price=st.sampled_from([Decimal("0"), Decimal("0.15"), Decimal("0.150"), Decimal("2.5")]),
    quantity=st.integers(0, 10**9),
    # Exact amounts: whole numbers of 1e-12 USD, as rating makes them.
    amount=st.integers(0, 10**15).map(lambda n: Decimal(n).scaleb(-12)),
)


def row(
    model: str, token_class: TokenClass, unit_price: str, quantity: int, amount: str
) -> InvoiceRow:
    return InvoiceRow(
        model=model,
        token_class=token_class,
        price_id=1,
        unit_price=Decimal(unit_price),
        quantity=quantity,
        amount=Decimal(amount),
    )


@PROPERTY
@given(st.lists(rows, max_size=40))
def test_lines_round_once_and_add_up_to_the_rounded_total(rows_: list[InvoiceRow]) -> None:
    invoice = build_invoice("t-1", "Acme", "2026-11", rows_)

    exact_by_line: dict[tuple[str, TokenClass, Decimal], Decimal] = {}
    quantity_by_line: dict[tuple[str, TokenClass, Decimal], int] = {}
    for r in rows_:
        key = (r.model, r.token_class, r.unit_price)
        exact_by_line[key] = exact_by_line.get(key, Decimal(0)) + r.amount
        quantity_by_line[key] = quantity_by_line.get(key, 0) + r.quantity
    exact_total = sum((r.amount for r in rows_), Decimal(0))

    assert invoice.exact_total_usd == exact_total
    assert invoice.total_usd == exact_total.quantize(CENT, rounding=ROUND_HALF_EVEN)
    assert sum((line.amount_usd for line in invoice.lines), Decimal(0)) == invoice.total_usd
    kept = {k for k in exact_by_line if exact_by_line[k] or quantity_by_line[k]}
    assert len(invoice.lines) == len(kept)
    for line in invoice.lines:
        key = (line.model, line.token_class, line.unit_price_per_mtok)
        assert line.amount_usd == line.amount_usd.quantize(CENT)
        assert abs(line.amount_usd - exact_by_line[key]) < CENT
        assert line.quantity == quantity_by_line[key]
    order = [
        (line.model, CLASS_ORDER.index(line.token_class), line.unit_price_per_mtok)
        for line in invoice.lines
    ]
    assert order == sorted(order)


def test_largest_remainders_take_the_missing_cents() -> None:
    rows_ = [
        row("a", TokenClass.INPUT, "1", 1, "0.004"),
        row("a", TokenClass.OUTPUT, "1", 1, "0.004"),
        row("b", TokenClass.INPUT, "1", 1, "0.007"),
    ]
    invoice = build_invoice("t-1", "Acme", "2026-11", rows_)
    # 1.5 cents in all round half-even to 2 cents; flooring gives 0, so the two largest
    # remainders take one cent each: 0.7 first, then the earlier of the two 0.4 ties.
    assert invoice.total_usd == Decimal("0.02")
    assert [line.amount_usd for line in invoice.lines] == [
        Decimal("0.01"),
        Decimal("0.00"),
        Decimal("0.01"),
    ]


def test_half_cent_totals_round_half_even() -> None:
    assert build_invoice(
        "t", "T", "2026-11", [row("a", TokenClass.INPUT, "1", 1, "0.125")]
    ).total_usd == Decimal("0.12")
    assert build_invoice(
        "t", "T", "2026-11", [row("a", TokenClass.INPUT, "1", 1, "0.135")]
    ).total_usd == Decimal("0.14")


def test_rounding_each_line_alone_would_drift() -> None:
    # Three lines of 0.5 cent: rounded alone (half-even) to 0.00 each, the invoice would
    # lose a cent and a half; largest remainder keeps the total at round(0.015) = 0.02.
    rows_ = [row(m, TokenClass.OUTPUT, "1", 1, "0.005") for m in ("a", "b", "c")]
    invoice = build_invoice("t-1", "Acme", "2026-11", rows_)
    assert invoice.total_usd == Decimal("0.02")
    assert [line.amount_usd for line in invoice.lines] == [
        Decimal("0.01"),
        Decimal("0.01"),
        Decimal("0.00"),
    ]


def test_rows_of_one_price_merge_and_empty_rows_drop() -> None:
    rows_ = [
        row("demo-chat", TokenClass.OUTPUT, "0.60", 1_000, "0.0006"),
        row("demo-chat", TokenClass.OUTPUT, "0.6", 2_000, "0.0012"),
        row("demo-chat", TokenClass.OUTPUT, "0.8", 1_000, "0.0008"),
        row("demo-chat", TokenClass.CACHED_INPUT, "0.075", 0, "0"),
        row("demo-chat", TokenClass.INPUT, "0.15", 10_000, "0.0015"),
        InvoiceRow(
            model="unpriced",
            token_class=TokenClass.INPUT,
            price_id=None,
            unit_price=Decimal(0),
            quantity=5,
            amount=Decimal(0),
        ),
    ]
    invoice = build_invoice("t-1", "Acme", "2026-11", rows_)
    assert [
        (line.model, line.token_class, line.unit_price_per_mtok, line.quantity)
        for line in invoice.lines
    ] == [
        ("demo-chat", TokenClass.INPUT, Decimal("0.15"), 10_000),
        ("demo-chat", TokenClass.OUTPUT, Decimal("0.6"), 3_000),
        ("demo-chat", TokenClass.OUTPUT, Decimal("0.8"), 1_000),
        ("unpriced", TokenClass.INPUT, Decimal("0"), 5),
    ]
    assert invoice.lines[1].description == "demo-chat output tokens at $0.6 per 1M tokens"
    assert invoice.exact_total_usd == Decimal("0.0041")
    assert invoice.total_usd == Decimal("0.00")


def test_an_empty_month_is_a_zero_invoice() -> None:
    invoice = build_invoice("t-1", "Acme", "2026-02", [])
    assert invoice.lines == []
    assert invoice.total_usd == 0
    assert invoice_to_dict(invoice)["total_usd"] == "0.00"


def test_invoice_to_dict_is_json_with_money_as_strings() -> None:
    rows_ = [
        row("demo-chat", TokenClass.INPUT, "10", 150_000, "1.5"),
        row("demo-chat", TokenClass.OUTPUT, "0.000001", 3, "0.000000000003"),
    ]
    body = invoice_to_dict(build_invoice("t-1", "Acme", "2026-12", rows_))
    assert json.loads(json.dumps(body)) == body
    assert body["period_start"] == "2026-12-01T00:00:00Z"
    assert body["period_end"] == "2027-01-01T00:00:00Z"
    assert body["currency"] == "USD"
    assert body["total_usd"] == "1.50"
    assert body["exact_total_usd"] == "1.500000000003"
    assert body["lines"][0] == {
        "model": "demo-chat",
        "token_class": "input",
        "description": "demo-chat input tokens at $10 per 1M tokens",
        "unit_price_per_mtok": "10",
        "quantity": 150_000,
        "amount_usd": "1.50",
    }
    assert body["lines"][1]["unit_price_per_mtok"] == "0.000001"
    assert body["lines"][1]["amount_usd"] == "0.00"


@pytest.mark.parametrize(
    ("period", "start", "end"),
    [
        ("2026-11", datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC)),
        ("2026-12", datetime(2026, 12, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC)),
        ("2028-02", datetime(2028, 2, 1, tzinfo=UTC), datetime(2028, 3, 1, tzinfo=UTC)),
    ],
)
def test_period_bounds(period: str, start: datetime, end: datetime) -> None:
    assert period_bounds(period) == (start, end)
    assert period_of(start) == period
    assert period_of(end) != period


@pytest.mark.parametrize(
    "period",
    ["2026-13", "2026-00", "2026-1", "26-11", "2026/11", "2026-11-01", " 2026-11", "", "٢٠٢٦-11"],
)
def test_malformed_periods_are_refused(period: str) -> None:
    with pytest.raises(ValueError, match="period"):
        period_bounds(period)
    with pytest.raises(ValueError, match="period"):
        build_invoice("t-1", "Acme", period, [])


def test_period_of_uses_the_utc_month() -> None:
    new_york = timezone(timedelta(hours=-5))
    assert period_of(datetime(2026, 11, 30, 20, 0, tzinfo=new_york)) == "2026-12"
    with pytest.raises(ValueError, match="timezone-aware"):
        period_of(datetime(2026, 11, 30))
