"""Calendar periods: the Lua date arithmetic, and budgets across midnight on a set clock."""

from __future__ import annotations

import datetime as dt

import pytest
import redis.asyncio

from gateway.quotas import Demand, Dimension, Limits, MemoryQuotaStore, Scope, ScopeUsage
from gateway.quotas._lua import PRELUDE
from tests.support.redis_server import RedisServer

INSTANTS = [
    "1970-01-01T00:00:00.000",
    "1999-12-31T23:59:59.999",
    "2000-02-28T12:00:00.000",
    "2000-02-29T23:59:59.999",
    "2023-02-28T23:59:59.999",
    "2024-01-31T00:00:00.001",
    "2024-02-29T23:59:59.250",
    "2024-03-01T00:00:00.000",
    "2024-12-31T23:59:59.999",
    "2025-06-30T13:14:15.161",
    "2100-02-28T23:59:59.999",
    "2100-03-01T00:00:00.000",
    "2400-02-29T08:00:00.000",
]


def expected(instant: dt.datetime) -> tuple[str, str, int, int]:
    """UTC day, month, and ms until the next day and the next month start."""
    day = instant.date()
    next_day = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), dt.UTC)
    year, month = (day.year + 1, 1) if day.month == 12 else (day.year, day.month + 1)
    next_month = dt.datetime(year, month, 1, tzinfo=dt.UTC)
    return (
        day.isoformat(),
        day.isoformat()[:7],
        (next_day - instant) // dt.timedelta(milliseconds=1),
        (next_month - instant) // dt.timedelta(milliseconds=1),
    )


def at(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC)


def epoch_ms(instant: dt.datetime) -> int:
    return (instant - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)) // dt.timedelta(milliseconds=1)


async def test_lua_periods_match_the_calendar(redis_server: RedisServer) -> None:
    client = redis.asyncio.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        for text in INSTANTS:
            instant = at(text)
            script = PRELUDE + "return {periods(tonumber(ARGV[1]))}"
            reply = await client.eval(script, 0, epoch_ms(instant))
            assert tuple(reply) == expected(instant), text
    finally:
        await client.aclose()


class Clock:
    def __init__(self, instant: dt.datetime) -> None:
        self.now = instant.timestamp()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.mark.parametrize("text", ["2024-02-29T23:59:59.250", "2024-12-31T23:59:59.250"])
async def test_budgets_reset_at_utc_midnight(text: str) -> None:
    clock = Clock(at(text))
    store = MemoryQuotaStore(window_s=60, clock=clock)
    daily = [Scope("tenant:t", Limits(daily_tokens=100))]
    monthly = [Scope("key:k", Limits(monthly_tokens=100))]
    first = Demand(request_id="r1", tokens=100)
    assert (await store.admit("t", daily + monthly, first, 30)).admitted

    refused = await store.admit("t", daily, Demand(request_id="r2", tokens=1), 30)
    assert (refused.dimension, refused.retry_after_s) == (Dimension.DAILY_TOKENS, 0.75)
    refused = await store.admit("t", monthly, Demand(request_id="r3", tokens=1), 30)
    assert (refused.dimension, refused.retry_after_s) == (Dimension.MONTHLY_TOKENS, 0.75)

    clock.advance(0.75)
    assert (
        await store.admit("t", daily + monthly, Demand(request_id="r4", tokens=60), 30)
    ).admitted
    # The late settle corrects the day and month it was reserved in, not today's.
    assert await store.settle("t", "r1", 10, 0)
    usage = await store.usage("t", "key:k")
    assert (usage.daily_tokens, usage.monthly_tokens, usage.tokens_in_window) == (60, 60, 70)


async def test_tombstones_and_records_expire() -> None:
    clock = Clock(at("2025-06-30T12:00:00"))
    store = MemoryQuotaStore(window_s=60, clock=clock)
    scopes = [Scope("tenant:t", Limits(rpm=10))]
    assert (await store.admit("t", scopes, Demand(request_id="a", tokens=5), 10)).admitted
    assert not await store.settle("t", "never", 0, 0)

    clock.advance(10 + 300)  # the lease and the record's margin: "a" is gone unsettled
    assert not await store.settle("t", "a", 5, 0)
    assert await store.usage("t", "tenant:t") == ScopeUsage(daily_tokens=5, monthly_tokens=5)

    clock.advance(3600)  # the tombstones too: the ids can be used again
    assert (await store.admit("t", scopes, Demand(request_id="never", tokens=1), 10)).admitted
    assert (await store.admit("t", scopes, Demand(request_id="a", tokens=1), 10)).admitted
