"""The price book and exact rating: properties over random prices, counts and instants."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from fractions import Fraction

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from billing.events import CacheTier, UsageEvent, decode_event, encode_event
from billing.pricing import (
    Price,
    PriceBook,
    TokenClass,
    class_amounts,
    device_cost,
    device_rate,
    quantities,
    rate,
    rerate,
    sum_quantities,
    to_nano_usd,
)

#: No example database: the tree is shared and ``.hypothesis/`` is not ignored by git.
PROPERTY = settings(database=None, deadline=None, max_examples=200)

T0 = datetime(2026, 3, 1, tzinfo=UTC)

prices_per_mtok = st.integers(0, 10**9).map(lambda n: Decimal(n).scaleb(-6))
counts = st.integers(0, 10**7)
instants = st.datetimes(
    min_value=datetime(2025, 1, 1), max_value=datetime(2027, 12, 31), timezones=st.just(UTC)
)


@st.composite
def usages(draw: st.DrawFn) -> tuple[int, int, int]:
    prompt = draw(counts)
    return prompt, draw(st.integers(0, prompt)), draw(counts)


@st.composite
def prices(draw: st.DrawFn, *, id: int = 1, model: str = "demo-chat") -> Price:
    return Price(
        id=id,
        model=model,
        input_per_mtok=draw(prices_per_mtok),
        cached_input_per_mtok=draw(prices_per_mtok),
        output_per_mtok=draw(prices_per_mtok),
        effective_from=draw(instants),
    )


@st.composite
def books(draw: st.DrawFn) -> PriceBook:
    """Up to four versions for each of two models, at distinct instants."""
    versions: list[Price] = []
    for model in ("demo-chat", "minilm"):
        starts = draw(st.lists(instants, min_size=1, max_size=4, unique=True))
        for start in starts:
            price = draw(prices(id=len(versions) + 1, model=model))
            versions.append(msgspec.structs.replace(price, effective_from=start))
    return PriceBook(versions)


def price(
    id: int = 1,
    *,
    model: str = "demo-chat",
    effective_from: datetime = T0,
    input: str = "0.15",
    cached: str = "0.075",
    output: str = "0.6",
) -> Price:
    return Price(
        id=id,
        model=model,
        input_per_mtok=Decimal(input),
        cached_input_per_mtok=Decimal(cached),
        output_per_mtok=Decimal(output),
        effective_from=effective_from,
    )


def event(
    when: datetime, model: str = "demo-chat", usage: tuple[int, int, int] = (0, 0, 0)
) -> UsageEvent:
    prompt, cached, completion = usage
    return UsageEvent(
        id="req-1",
        occurred_at=when,
        tenant_id="t-1",
        key_id="k-1",
        model=model,
        operation="chat",
        prompt_tokens=prompt,
        cached_tokens=cached,
        completion_tokens=completion,
    )


@PROPERTY
@given(prices(), usages())
def test_rate_is_the_exact_sum_over_classes(p: Price, usage: tuple[int, int, int]) -> None:
    prompt, cached, completion = usage
    expected = (
        Fraction(prompt - cached) * Fraction(p.input_per_mtok)
        + Fraction(cached) * Fraction(p.cached_input_per_mtok)
        + Fraction(completion) * Fraction(p.output_per_mtok)
    ) / 1_000_000
    cost = rate(p, *usage)
    assert isinstance(cost, Decimal)
    assert Fraction(cost) == expected
    assert sum(class_amounts(p, *usage).values()) == cost
    # Every cost is a whole number of 1e-12 USD.
    assert cost == cost.quantize(Decimal("1e-12"))


@PROPERTY
@given(prices(), st.lists(usages(), min_size=1, max_size=20))
def test_rate_is_additive(p: Price, usages_: list[tuple[int, int, int]]) -> None:
    total = tuple(sum(column) for column in zip(*usages_, strict=True))
    assert rate(p, *total) == sum(rate(p, *usage) for usage in usages_)


@PROPERTY
@given(books(), st.sampled_from(["demo-chat", "minilm", "unpriced"]), instants, usages())
def test_rerating_with_the_rating_book_is_the_identity(
    book: PriceBook, model: str, when: datetime, usage: tuple[int, int, int]
) -> None:
    rated = rerate(event(when, model, usage), book)
    version = book.price_at(model, when)
    assert rated.price_id == (None if version is None else version.id)
    assert rated.cost_usd == rate(version, *usage)
    assert rerate(rated, book) == rated
    # As the ledger would store and load it.
    assert rerate(decode_event(encode_event(rated)), book) == rated


@PROPERTY
@given(books(), st.sampled_from(["demo-chat", "minilm"]))
def test_a_version_starts_at_its_effective_from(book: PriceBook, model: str) -> None:
    versions = book.versions(model)
    assert [v.effective_from for v in versions] == sorted(v.effective_from for v in versions)
    tick = timedelta(microseconds=1)
    assert book.price_at(model, versions[0].effective_from - tick) is None
    for older, newer in itertools.pairwise(versions):
        assert book.price_at(model, newer.effective_from) == newer
        assert book.price_at(model, newer.effective_from - tick) == older
        assert rerate(event(newer.effective_from, model), book).price_id == newer.id
        assert rerate(event(newer.effective_from - tick, model), book).price_id == older.id
    assert book.current(model, versions[-1].effective_from + timedelta(days=3650)) == versions[-1]


def test_boundary_instants_in_other_timezones() -> None:
    old, new = price(1), price(2, effective_from=T0 + timedelta(days=30), output="0.8")
    book = PriceBook([new, old])
    paris = timezone(timedelta(hours=1))
    boundary_in_paris = (T0 + timedelta(days=30)).astimezone(paris)
    assert book.price_at("demo-chat", boundary_in_paris) == new
    assert book.price_at("demo-chat", boundary_in_paris - timedelta(microseconds=1)) == old
    assert book.price_at("other", boundary_in_paris) is None
    assert book.models() == ["demo-chat"]
    assert book.by_id == {1: old, 2: new}
    with pytest.raises(ValueError, match="timezone-aware"):
        book.price_at("demo-chat", datetime(2026, 5, 1))


def test_no_price_rates_zero() -> None:
    assert rate(None, 1000, 10, 1000) == 0
    assert class_amounts(None, 5, 0, 5) == dict.fromkeys(TokenClass, Decimal(0))


def test_embedding_input_uses_the_input_price() -> None:
    minilm = price(model="minilm", input="0.02", cached="0", output="0")
    assert rate(minilm, 1_000_000, 0, 0) == Decimal("0.02")
    assert rate(minilm, 3, 0, 0) == Decimal("0.00000006")


@pytest.mark.parametrize(
    ("prompt", "cached", "completion", "expected"),
    [
        (100, 30, 7, (70, 30, 7)),
        (100, 0, 0, (100, 0, 0)),
        (10, 25, 1, (0, 10, 1)),
        (0, 0, 0, (0, 0, 0)),
    ],
)
def test_quantities(
    prompt: int, cached: int, completion: int, expected: tuple[int, int, int]
) -> None:
    split = dict(
        zip((TokenClass.INPUT, TokenClass.CACHED_INPUT, TokenClass.OUTPUT), expected, strict=True)
    )
    assert quantities(prompt, cached, completion) == {**dict.fromkeys(TokenClass, 0), **split}


def test_negative_counts_are_refused() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        quantities(-1, 0, 0)
    with pytest.raises(ValueError, match="non-negative"):
        rate(price(), 0, 0, -5)


@pytest.mark.parametrize(
    ("amount", "nanos"),
    [
        ("0", 0),
        ("0.000000001", 1),
        ("0.0000000011", 2),
        ("0.000000000001", 1),
        ("1.5", 1_500_000_000),
        ("-0.0000000015", -1),
    ],
)
def test_to_nano_usd_rounds_up(amount: str, nanos: int) -> None:
    assert to_nano_usd(Decimal(amount)) == nanos


@PROPERTY
@given(prices(), usages())
def test_reservations_never_under_hold(p: Price, usage: tuple[int, int, int]) -> None:
    cost = rate(p, *usage)
    nanos = to_nano_usd(cost)
    assert nanos - 1 < Fraction(cost) * 10**9 <= nanos


def test_to_nano_usd_refuses_non_finite() -> None:
    with pytest.raises(ValueError, match="finite"):
        to_nano_usd(Decimal("NaN"))


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("input_per_mtok", Decimal("0.0000001"), ValueError),
        ("output_per_mtok", Decimal("-1"), ValueError),
        ("cached_input_per_mtok", Decimal("Infinity"), ValueError),
        ("output_per_mtok", 0.6, TypeError),
        ("effective_from", datetime(2026, 1, 1), ValueError),
        ("model", "", ValueError),
    ],
)
def test_invalid_prices_are_refused(field: str, value: object, error: type[Exception]) -> None:
    with pytest.raises(error):
        msgspec.structs.replace(price(), **{field: value})


def test_trailing_zeros_beyond_six_decimals_are_fine() -> None:
    assert price(input="0.150000000").input_per_mtok == Decimal("0.15")


def test_prices_decode_from_json_with_validation() -> None:
    body = (
        b'{"id": 3, "model": "demo-chat", "input_per_mtok": "0.15", "cached_input_per_mtok": 0.075,'
        b' "output_per_mtok": "0.6", "effective_from": "2026-03-01T00:00:00Z"}'
    )
    assert msgspec.json.decode(body, type=Price) == price(3)
    with pytest.raises(msgspec.ValidationError, match="decimals"):
        msgspec.json.decode(body.replace(b'"0.15"', b'"0.15000001"'), type=Price)


def test_book_refuses_ambiguous_versions() -> None:
    with pytest.raises(ValueError, match="duplicate price id"):
        PriceBook([price(1), price(1, effective_from=T0 + timedelta(days=1))])
    with pytest.raises(ValueError, match="take effect at"):
        PriceBook([price(1), price(2, output="0.9")])


def test_response_cache_answers_default_to_cached_input_and_free_output() -> None:
    p = price(input="2", cached="0.5", output="8")
    # A hit's prompt is all response-cache input, its output free by default.
    assert quantities(1000, 1000, 400, CacheTier.RESPONSE) == {
        TokenClass.INPUT: 0,
        TokenClass.CACHED_INPUT: 0,
        TokenClass.OUTPUT: 0,
        TokenClass.RESPONSE_INPUT: 1000,
        TokenClass.RESPONSE_OUTPUT: 400,
    }
    assert rate(p, 1_000_000, 0, 1_000_000, CacheTier.RESPONSE) == Decimal("0.5")
    assert rate(p, 1_000_000, 0, 1_000_000) == Decimal("10")
    priced = msgspec.structs.replace(
        p, response_input_per_mtok=Decimal("0.25"), response_output_per_mtok=Decimal("1")
    )
    assert rate(priced, 1_000_000, 0, 1_000_000, CacheTier.RESPONSE) == Decimal("1.25")
    # A prefix-cache tier prices like no tier at all: the cached count says it.
    assert rate(priced, 100, 40, 10, CacheTier.PREFIX) == rate(priced, 100, 40, 10)


@given(usage=usages(), hit=usages())
@PROPERTY
def test_summed_counts_split_like_the_events(
    usage: tuple[int, int, int], hit: tuple[int, int, int]
) -> None:
    """A rollup sums an ordinary event and a hit; its split equals the events' splits."""
    (prompt, cached, completion), (hit_prompt, _, hit_completion) = usage, hit
    one = quantities(prompt, cached, completion)
    other = quantities(hit_prompt, hit_prompt, hit_completion, CacheTier.RESPONSE)
    summed = sum_quantities(
        prompt + hit_prompt,
        cached + hit_prompt,
        completion + hit_completion,
        hit_prompt,
        hit_completion,
    )
    assert summed == {cls: one[cls] + other[cls] for cls in TokenClass}


def test_response_prices_are_checked() -> None:
    with pytest.raises(ValueError, match="response_output_per_mtok"):
        msgspec.structs.replace(price(), response_output_per_mtok=Decimal("-1"))


def test_device_time_is_priced_per_device_hour_to_the_ledgers_precision() -> None:
    assert device_cost(3_600_000.0, Decimal("2.49")) == Decimal("2.49")
    assert device_cost(1.0, Decimal("3.6")) == Decimal("0.000001")
    # 1 ms at $1 an hour is 2.777...e-7 USD: rounded half-even to 1e-12.
    assert device_cost(1.0, Decimal("1")) == Decimal("0.000000277778")
    assert device_cost(0.1, Decimal("1")) == Decimal("0.000000027778")
    assert device_cost(None, Decimal("1")) == 0
    assert device_cost(12.5, None) == 0
    with pytest.raises(ValueError, match="finite"):
        device_cost(float("inf"), Decimal("1"))


@pytest.mark.parametrize("value", ["-1", "abc", "1.0000001", "NaN", "inf"])
def test_a_device_rate_is_checked_as_a_price_is(value: str) -> None:
    with pytest.raises(ValueError, match="device cost per hour"):
        device_rate(value)


def test_device_rates_parse() -> None:
    assert device_rate("0.90") == Decimal("0.90")
    assert device_rate(" 2 ") == Decimal(2)
    assert device_rate("") is None
    assert device_rate(None) is None
