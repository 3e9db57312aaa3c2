"""One suite every quota store passes: the same figures from memory and from Redis."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid

import pytest

from gateway.quotas import Decision, Demand, Dimension, Limits, QuotaStore, Scope, ScopeUsage
from tests.gateway.quotas.conftest import WINDOW_S, StoreFactory

P = "ten_1"
TENANT = "tenant:ten_1"
KEY = "key:key_1"
LEASE_S = 30.0


def tenant(**limits: int) -> Scope:
    return Scope(TENANT, Limits(**limits))


def key(**limits: int) -> Scope:
    return Scope(KEY, Limits(**limits))


def demand(tokens: int = 0, spend_nusd: int = 0) -> Demand:
    return Demand(request_id=uuid.uuid4().hex, tokens=tokens, spend_nusd=spend_nusd)


async def admit(
    store: QuotaStore,
    scopes: list[Scope],
    tokens: int = 0,
    spend_nusd: int = 0,
    lease_s: float = LEASE_S,
) -> tuple[str, Decision]:
    ask = demand(tokens, spend_nusd)
    return ask.request_id, await store.admit(P, scopes, ask, lease_s)


def until_next_day_s() -> float:
    now = dt.datetime.now(dt.UTC)
    start = dt.datetime.combine(now.date() + dt.timedelta(days=1), dt.time(), dt.UTC)
    return (start - now).total_seconds()


def until_next_month_s() -> float:
    now = dt.datetime.now(dt.UTC)
    year, month = (now.year + 1, 1) if now.month == 12 else (now.year, now.month + 1)
    return (dt.datetime(year, month, 1, tzinfo=dt.UTC) - now).total_seconds()


async def test_rpm_admits_exactly_up_to_the_limit(store: QuotaStore) -> None:
    scopes = [tenant(rpm=3)]
    for left in (2, 1, 0):
        _, decision = await admit(store, scopes)
        assert decision.admitted
        assert (decision.dimension, decision.scope, decision.retry_after_s) == (None, None, None)
        assert (decision.limit_requests, decision.remaining_requests) == (3, left)
        assert decision.reset_requests_s is not None
        assert 0 < decision.reset_requests_s <= WINDOW_S
        assert (decision.limit_tokens, decision.remaining_tokens) == (None, None)
        assert decision.reset_tokens_s is None

    _, refused = await admit(store, scopes)
    assert not refused.admitted
    assert (refused.dimension, refused.scope) == (Dimension.RPM, TENANT)
    assert refused.retry_after_s is not None
    assert 0 < refused.retry_after_s <= WINDOW_S
    assert (refused.limit_requests, refused.remaining_requests) == (3, 0)
    assert await store.usage(P, TENANT) == ScopeUsage(
        requests_in_window=3, in_flight=3, open_reservations=3
    )


async def test_zero_rpm_refuses_for_a_whole_window(store: QuotaStore) -> None:
    _, refused = await admit(store, [tenant(rpm=0)])
    assert (refused.admitted, refused.dimension, refused.retry_after_s) == (
        False,
        Dimension.RPM,
        WINDOW_S,
    )
    assert (refused.limit_requests, refused.remaining_requests) == (0, 0)
    assert refused.reset_requests_s == 0


async def test_concurrent_admissions_admit_exactly_rpm(store_factory: StoreFactory) -> None:
    store = await store_factory(60)
    scopes = [tenant(rpm=50), key(rpm=50)]
    decisions = await asyncio.gather(*(admit(store, scopes) for _ in range(200)))
    admitted = [d for _, d in decisions if d.admitted]
    refused = [d for _, d in decisions if not d.admitted]
    assert len(admitted) == 50
    assert sorted(d.remaining_requests or 0 for d in admitted) == list(range(50))
    assert {(d.dimension, d.scope, d.remaining_requests) for d in refused} == {
        (Dimension.RPM, TENANT, 0)
    }
    for scope in (TENANT, KEY):
        usage = await store.usage(P, scope)
        assert (usage.requests_in_window, usage.in_flight) == (50, 50)


async def test_token_budget_holds_under_concurrency(store_factory: StoreFactory) -> None:
    store = await store_factory(60)
    scopes = [tenant(daily_tokens=1000), key(rpm=1000)]
    decisions = await asyncio.gather(*(admit(store, scopes, tokens=100) for _ in range(30)))
    admitted = [rid for rid, d in decisions if d.admitted]
    refused = [d for _, d in decisions if not d.admitted]
    assert len(admitted) == 10
    assert {(d.dimension, d.scope) for d in refused} == {(Dimension.DAILY_TOKENS, TENANT)}
    for d in refused:
        assert d.retry_after_s is not None
        assert abs(d.retry_after_s - until_next_day_s()) < 5
    assert (await store.usage(P, TENANT)).daily_tokens == 1000

    settled = await asyncio.gather(*(store.settle(P, rid, 40, 0) for rid in admitted))
    assert settled == [True] * 10
    for scope in (TENANT, KEY):
        assert await store.usage(P, scope) == ScopeUsage(
            requests_in_window=10, tokens_in_window=400, daily_tokens=400, monthly_tokens=400
        )

    _, fits = await admit(store, scopes, tokens=600)
    assert fits.admitted
    _, over = await admit(store, scopes, tokens=1)
    assert (over.admitted, over.dimension) == (False, Dimension.DAILY_TOKENS)


async def test_refusal_changes_nothing_anywhere(store: QuotaStore) -> None:
    tenant_scope = tenant(rpm=100, tpm=10_000, max_concurrency=10, daily_tokens=10_000)
    scopes = [tenant_scope, key(rpm=1)]
    _, first = await admit(store, scopes, tokens=100, spend_nusd=7)
    assert first.admitted
    before = [await store.usage(P, TENANT), await store.usage(P, KEY)]
    assert before[0] == ScopeUsage(
        requests_in_window=1,
        tokens_in_window=100,
        in_flight=1,
        daily_tokens=100,
        monthly_tokens=100,
        monthly_spend_nusd=7,
        open_reservations=1,
    )
    assert before[1] == before[0]

    _, refused = await admit(store, scopes, tokens=100, spend_nusd=7)
    assert (refused.admitted, refused.dimension, refused.scope) == (False, Dimension.RPM, KEY)
    assert [await store.usage(P, TENANT), await store.usage(P, KEY)] == before


async def test_budgets_are_checked_before_rate_limits(store: QuotaStore) -> None:
    scopes = [
        tenant(rpm=1, daily_tokens=1000, monthly_tokens=50),
        key(monthly_spend_nusd=10),
    ]
    _, first = await admit(store, scopes, tokens=10, spend_nusd=5)
    assert first.admitted
    # Every limit but daily_tokens fails: the spend budget (of the key) comes first.
    _, refused = await admit(store, scopes, tokens=100, spend_nusd=100)
    assert (refused.dimension, refused.scope) == (Dimension.MONTHLY_SPEND, KEY)
    _, refused = await admit(store, scopes, tokens=100)
    assert (refused.dimension, refused.scope) == (Dimension.MONTHLY_TOKENS, TENANT)
    _, refused = await admit(store, [tenant(rpm=1), key(daily_tokens=50)], tokens=100)
    assert (refused.dimension, refused.scope) == (Dimension.DAILY_TOKENS, KEY)
    assert refused.retry_after_s is not None
    assert abs(refused.retry_after_s - until_next_day_s()) < 5
    _, refused = await admit(store, scopes)
    assert (refused.dimension, refused.scope) == (Dimension.RPM, TENANT)


async def test_headers_follow_the_tightest_scope(store: QuotaStore) -> None:
    scopes = [tenant(rpm=10, tpm=1000), key(rpm=3, tpm=5000)]
    _, d = await admit(store, scopes, tokens=300)
    assert (d.limit_requests, d.remaining_requests) == (3, 2)
    assert (d.limit_tokens, d.remaining_tokens) == (1000, 700)
    assert d.reset_requests_s is not None
    assert 0 < d.reset_requests_s <= WINDOW_S
    assert d.reset_tokens_s is not None
    assert 0 < d.reset_tokens_s <= WINDOW_S
    _, d = await admit(store, scopes, tokens=300)
    assert (d.admitted, d.remaining_requests, d.remaining_tokens) == (True, 1, 400)

    _, refused = await admit(store, scopes, tokens=500)
    assert (refused.admitted, refused.dimension, refused.scope) == (False, Dimension.TPM, TENANT)
    assert (refused.limit_requests, refused.remaining_requests) == (3, 1)
    assert (refused.limit_tokens, refused.remaining_tokens) == (1000, 400)
    assert refused.retry_after_s is not None
    assert 0 < refused.retry_after_s <= WINDOW_S


async def test_concurrency_slots(store: QuotaStore) -> None:
    scopes = [tenant(max_concurrency=3)]
    held = []
    for _ in range(3):
        rid, decision = await admit(store, scopes)
        assert decision.admitted
        held.append(rid)
    _, refused = await admit(store, scopes)
    assert (refused.admitted, refused.dimension, refused.scope) == (
        False,
        Dimension.CONCURRENCY,
        TENANT,
    )
    assert refused.retry_after_s == 1.0
    assert (await store.usage(P, TENANT)).in_flight == 3

    assert await store.settle(P, held[0], 0, 0)
    _, after = await admit(store, scopes)
    assert after.admitted
    usage = await store.usage(P, TENANT)
    assert (usage.in_flight, usage.open_reservations) == (3, 3)


async def test_expired_lease_frees_the_slot(store: QuotaStore) -> None:
    scopes = [key(max_concurrency=1)]
    lost, first = await admit(store, scopes, tokens=10, lease_s=0.3)
    assert first.admitted
    _, refused = await admit(store, scopes, lease_s=0.3)
    assert (refused.admitted, refused.dimension) == (False, Dimension.CONCURRENCY)
    assert refused.retry_after_s is not None
    assert 0 < refused.retry_after_s <= 0.3  # the lease ends before the default second

    await asyncio.sleep(refused.retry_after_s + 0.05)
    _, again = await admit(store, scopes, tokens=10, lease_s=0.3)
    assert again.admitted
    usage = await store.usage(P, KEY)
    # The lost request's slot is free, but its reservation waits to be settled.
    assert (usage.in_flight, usage.open_reservations, usage.daily_tokens) == (1, 2, 20)
    assert await store.settle(P, lost, 4, 0)
    usage = await store.usage(P, KEY)
    assert (usage.in_flight, usage.open_reservations, usage.daily_tokens) == (1, 1, 14)


async def test_settle_is_idempotent(store: QuotaStore) -> None:
    scopes = [tenant(rpm=5, tpm=1000, daily_tokens=1000)]
    rid, decision = await admit(store, scopes, tokens=100, spend_nusd=1000)
    assert decision.admitted
    assert await store.settle(P, rid, 40, 400)
    settled = ScopeUsage(
        requests_in_window=1,
        tokens_in_window=40,
        daily_tokens=40,
        monthly_tokens=40,
        monthly_spend_nusd=400,
    )
    assert await store.usage(P, TENANT) == settled

    assert not await store.settle(P, rid, 99, 999)
    assert not await store.release(P, rid)
    assert await store.usage(P, TENANT) == settled

    again = await store.admit(P, scopes, Demand(request_id=rid, tokens=100), LEASE_S)
    assert (again.admitted, again.dimension, again.scope, again.retry_after_s) == (
        False,
        None,
        None,
        None,
    )
    assert (again.limit_requests, again.remaining_requests) == (5, 4)
    assert (again.limit_tokens, again.remaining_tokens) == (1000, 960)
    assert await store.usage(P, TENANT) == settled


async def test_settle_of_an_unknown_id_refuses_its_late_admission(store: QuotaStore) -> None:
    assert not await store.settle(P, "req_never_admitted", 50, 50)
    assert await store.usage(P, TENANT) == ScopeUsage()

    late = await store.admit(
        P, [tenant(rpm=5)], Demand(request_id="req_never_admitted", tokens=1), 5
    )
    assert (late.admitted, late.dimension, late.remaining_requests) == (False, None, 5)
    assert await store.usage(P, TENANT) == ScopeUsage()


async def test_an_open_request_id_is_not_reserved_twice(store: QuotaStore) -> None:
    scopes = [tenant(rpm=5)]
    ask = demand(tokens=10)
    assert (await store.admit(P, scopes, ask, LEASE_S)).admitted
    twice = await store.admit(P, scopes, ask, LEASE_S)
    assert (twice.admitted, twice.dimension, twice.remaining_requests) == (False, None, 4)
    assert (await store.usage(P, TENANT)).requests_in_window == 1
    assert await store.release(P, ask.request_id)
    assert (await store.usage(P, TENANT)).open_reservations == 0


async def test_settle_corrects_every_counter_to_real_usage(store_factory: StoreFactory) -> None:
    store = await store_factory(60)
    limits = {"tpm": 1000, "daily_tokens": 5000, "monthly_tokens": 50_000}
    scopes = [tenant(**limits, monthly_spend_nusd=10**12), key(rpm=100)]
    rid, decision = await admit(store, scopes, tokens=100, spend_nusd=7_000_000_000)
    assert decision.admitted
    usage = await store.usage(P, TENANT)
    assert (usage.tokens_in_window, usage.daily_tokens, usage.monthly_tokens) == (100, 100, 100)
    assert usage.monthly_spend_nusd == 7_000_000_000

    assert await store.settle(P, rid, 30, 2_500_000_001)
    for scope in (TENANT, KEY):
        assert await store.usage(P, scope) == ScopeUsage(
            requests_in_window=1,
            tokens_in_window=30,
            daily_tokens=30,
            monthly_tokens=30,
            monthly_spend_nusd=2_500_000_001,
        )
    _, d = await admit(store, scopes, tokens=50)
    assert d.remaining_tokens == 1000 - 30 - 50

    # More than reserved is corrected upwards.
    rid, _ = await admit(store, scopes, tokens=10, spend_nusd=1)
    assert await store.settle(P, rid, 25, 3)
    usage = await store.usage(P, TENANT)
    assert (usage.tokens_in_window, usage.daily_tokens, usage.monthly_tokens) == (105, 105, 105)
    assert usage.monthly_spend_nusd == 2_500_000_004


async def test_window_expiry_refills_requests_and_tokens(store: QuotaStore) -> None:
    requests, tokens = [tenant(rpm=2)], [key(tpm=100)]
    for _ in range(2):
        assert (await admit(store, requests))[1].admitted
    assert (await admit(store, tokens, tokens=70))[1].admitted

    _, no_request = await admit(store, requests)
    _, no_tokens = await admit(store, tokens, tokens=50)
    _, never_fits = await admit(store, tokens, tokens=150)
    assert (no_request.dimension, no_tokens.dimension) == (Dimension.RPM, Dimension.TPM)
    assert (never_fits.dimension, never_fits.retry_after_s) == (Dimension.TPM, WINDOW_S)
    assert no_request.retry_after_s is not None
    assert no_tokens.retry_after_s is not None
    assert 0 < no_request.retry_after_s <= WINDOW_S
    assert 0 < no_tokens.retry_after_s <= WINDOW_S

    await asyncio.sleep(max(no_request.retry_after_s, no_tokens.retry_after_s) + 0.05)
    assert (await admit(store, requests))[1].admitted
    assert (await admit(store, tokens, tokens=50))[1].admitted
    await asyncio.sleep(WINDOW_S + 0.05)
    usage = await store.usage(P, TENANT)
    assert (usage.requests_in_window, usage.tokens_in_window, usage.in_flight) == (0, 0, 3)
    assert (await store.usage(P, KEY)).daily_tokens == 120


async def test_monthly_spend_budget(store: QuotaStore) -> None:
    scopes = [tenant(monthly_spend_nusd=1_000_000)]
    assert (await admit(store, scopes, spend_nusd=600_000))[1].admitted
    _, refused = await admit(store, scopes, spend_nusd=500_000)
    assert (refused.admitted, refused.dimension, refused.scope) == (
        False,
        Dimension.MONTHLY_SPEND,
        TENANT,
    )
    assert refused.retry_after_s is not None
    assert abs(refused.retry_after_s - until_next_month_s()) < 5
    assert (await admit(store, scopes, spend_nusd=400_000))[1].admitted
    assert not (await admit(store, scopes, spend_nusd=1))[1].admitted
    assert (await store.usage(P, TENANT)).monthly_spend_nusd == 1_000_000


async def test_unlimited_scopes_admit_and_track_usage(store: QuotaStore) -> None:
    scopes = [Scope(TENANT, Limits()), Scope(KEY, Limits())]
    for _ in range(20):
        _, decision = await admit(store, scopes, tokens=5, spend_nusd=3)
        assert decision == Decision(admitted=True)
    for scope in (TENANT, KEY):
        assert await store.usage(P, scope) == ScopeUsage(
            requests_in_window=20,
            tokens_in_window=100,
            in_flight=20,
            daily_tokens=100,
            monthly_tokens=100,
            monthly_spend_nusd=60,
            open_reservations=20,
        )


async def test_partitions_count_apart(store: QuotaStore) -> None:
    scopes = [tenant(rpm=1)]
    assert (await store.admit("ten_1", scopes, demand(), LEASE_S)).admitted
    assert (await store.admit("ten_2", scopes, demand(), LEASE_S)).admitted
    assert not (await store.admit("ten_2", scopes, demand(), LEASE_S)).admitted
    assert (await store.usage("ten_2", TENANT)).requests_in_window == 1


@pytest.mark.parametrize(
    ("partition", "lease_s", "tokens"), [("", 1.0, 0), ("a{b}", 1.0, 0), (P, 0.0, 0), (P, 1.0, -1)]
)
async def test_invalid_arguments_are_refused(
    store: QuotaStore, partition: str, lease_s: float, tokens: int
) -> None:
    with pytest.raises(ValueError, match="must"):
        await store.admit(
            partition, [tenant(rpm=1)], Demand(request_id="r", tokens=tokens), lease_s
        )
    assert await store.usage(P, TENANT) == ScopeUsage()


async def test_ping(store: QuotaStore) -> None:
    await store.ping()
