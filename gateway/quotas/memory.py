"""The in-process quota store: the embedded default, for a single gateway process.

It keeps the Redis store's counters and semantics (see ``gateway.quotas._lua`` for the
layout) in dictionaries. A check and its reservation never await, so each call is one
atomic step on the event loop; it is not safe to share between threads or processes.
"""

from __future__ import annotations

import datetime as dt
import heapq
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from gateway.quotas._common import (
    RECORD_MARGIN_S,
    TOMBSTONE_TTL_S,
    check_admission,
    check_partition,
    check_settlement,
)
from gateway.quotas.store import (
    Decision,
    Demand,
    Dimension,
    QuotaStore,
    Scope,
    ScopeUsage,
)

__all__ = ["MemoryQuotaStore"]

#: Budget counters are kept this many days past their day (month).
_DAY_KEEP = 2
_MONTH_KEEP = 35

_DAY_MS = 86_400_000
_EPOCH = dt.date(1970, 1, 1)
_CHECK_ORDER = (
    Dimension.MONTHLY_SPEND,
    Dimension.MONTHLY_TOKENS,
    Dimension.DAILY_TOKENS,
    Dimension.CONCURRENCY,
    Dimension.RPM,
    Dimension.TPM,
)
_RECORD, _TOMBSTONE = 0, 1


@dataclass(slots=True)
class _Counters:
    """One scope's counters."""

    requests: dict[int, int] = field(default_factory=dict)  # second -> requests
    tokens: dict[int, int] = field(default_factory=dict)  # second -> tokens
    leases: dict[str, int] = field(default_factory=dict)  # request id -> lease expiry, ms
    day_tokens: dict[str, int] = field(default_factory=dict)  # YYYY-MM-DD -> tokens
    month_tokens: dict[str, int] = field(default_factory=dict)  # YYYY-MM -> tokens
    month_spend: dict[str, int] = field(default_factory=dict)  # YYYY-MM -> nano-USD


@dataclass(frozen=True, slots=True)
class _Reservation:
    scopes: tuple[str, ...]
    second: int
    day: str
    month: str
    tokens: int
    spend_nusd: int
    expires_ms: int


@dataclass(frozen=True, slots=True)
class _Period:
    day: str
    month: str
    to_day_ms: int  # until the next UTC day starts
    to_month_ms: int  # until the next UTC month starts
    oldest_day: str  # counters of older days are dropped
    oldest_month: str


@dataclass(slots=True)
class _View:
    """A scope's figures at admission, before this request."""

    scope: Scope
    counters: _Counters
    requests: int
    request_buckets: list[tuple[int, int]]  # non-empty buckets in the window, oldest first
    tokens: int
    token_buckets: list[tuple[int, int]]
    live_leases: list[int]  # expiry of each live lease, ms
    day_tokens: int
    month_tokens: int
    month_spend: int


class MemoryQuotaStore(QuotaStore):
    """Quota counters in this process's memory.

    Args:
        window_s: the length of the requests and tokens window, in seconds.
        clock: seconds since the epoch (UTC); the store's clock for windows and periods.
    """

    def __init__(self, *, window_s: int = 60, clock: Callable[[], float] = time.time) -> None:
        if window_s < 1:
            raise ValueError("window_s must be at least 1")
        self._window_s = window_s
        self._clock = clock
        self._counters: dict[tuple[str, str], _Counters] = {}
        self._records: dict[tuple[str, str], _Reservation] = {}
        self._tombstones: dict[tuple[str, str], int] = {}
        # (expiry ms, kind, partition, request id) of records and tombstones, to drop them.
        self._expiries: list[tuple[int, int, str, str]] = []

    async def admit(
        self, partition: str, scopes: Sequence[Scope], demand: Demand, lease_s: float
    ) -> Decision:
        check_admission(partition, scopes, demand, lease_s)
        now = self._now_ms()
        self._expire(now)
        second = now // 1000
        period = _period(now)
        views = [self._view(partition, scope, now, period) for scope in scopes]

        key = (partition, demand.request_id)
        refusal: tuple[Dimension, str, int] | None = None
        if key in self._records or key in self._tombstones:
            admitted = False
        else:
            refusal = self._refusal(views, demand, now, period)
            admitted = refusal is None
        if admitted:
            self._reserve(key, views, demand, now, period, math.ceil(lease_s * 1000))

        req = _headers(
            [(v.scope.limits.rpm, v.requests, v.request_buckets) for v in views],
            1 if admitted else 0,
            second,
            self._window_s,
            now,
        )
        tok = _headers(
            [(v.scope.limits.tpm, v.tokens, v.token_buckets) for v in views],
            demand.tokens if admitted else 0,
            second,
            self._window_s,
            now,
        )
        return Decision(
            admitted=admitted,
            dimension=refusal[0] if refusal else None,
            scope=refusal[1] if refusal else None,
            retry_after_s=refusal[2] / 1000 if refusal else None,
            limit_requests=req[0],
            remaining_requests=req[1],
            reset_requests_s=req[2],
            limit_tokens=tok[0],
            remaining_tokens=tok[1],
            reset_tokens_s=tok[2],
        )

    async def settle(self, partition: str, request_id: str, tokens: int, spend_nusd: int) -> bool:
        check_settlement(partition, request_id, tokens, spend_nusd)
        now = self._now_ms()
        self._expire(now)
        key = (partition, request_id)
        self._tombstones[key] = now + TOMBSTONE_TTL_S * 1000
        heapq.heappush(self._expiries, (self._tombstones[key], _TOMBSTONE, *key))
        record = self._records.pop(key, None)
        if record is None:
            return False

        token_delta = tokens - record.tokens
        spend_delta = spend_nusd - record.spend_nusd
        in_window = record.second >= now // 1000 - self._window_s + 1
        for name in record.scopes:
            counters = self._counters.get((partition, name))
            if counters is None:
                continue
            counters.leases.pop(request_id, None)
            if token_delta:
                if in_window and record.second in counters.tokens:
                    counters.tokens[record.second] += token_delta
                _add_existing(counters.day_tokens, record.day, token_delta)
                _add_existing(counters.month_tokens, record.month, token_delta)
            if spend_delta:
                _add_existing(counters.month_spend, record.month, spend_delta)
        return True

    async def usage(self, partition: str, scope: str) -> ScopeUsage:
        check_partition(partition)
        counters = self._counters.get((partition, scope))
        if counters is None:
            return ScopeUsage()
        now = self._now_ms()
        lo = now // 1000 - self._window_s + 1
        period = _period(now)
        return ScopeUsage(
            requests_in_window=sum(v for s, v in counters.requests.items() if s >= lo),
            tokens_in_window=sum(v for s, v in counters.tokens.items() if s >= lo),
            in_flight=sum(1 for expiry in counters.leases.values() if expiry > now),
            daily_tokens=counters.day_tokens.get(period.day, 0),
            monthly_tokens=counters.month_tokens.get(period.month, 0),
            monthly_spend_nusd=counters.month_spend.get(period.month, 0),
            open_reservations=sum(
                1 for expiry in counters.leases.values() if expiry > now - RECORD_MARGIN_S * 1000
            ),
        )

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def _now_ms(self) -> int:
        return math.floor(self._clock() * 1000)

    def _expire(self, now: int) -> None:
        """Drop the reservation records and tombstones whose time is up."""
        while self._expiries and self._expiries[0][0] <= now:
            expiry, kind, partition, request_id = heapq.heappop(self._expiries)
            key = (partition, request_id)
            if kind == _RECORD:
                record = self._records.get(key)
                if record is not None and record.expires_ms == expiry:
                    del self._records[key]
            elif self._tombstones.get(key) == expiry:
                del self._tombstones[key]

    def _view(self, partition: str, scope: Scope, now: int, period: _Period) -> _View:
        """Read a scope's figures, dropping what has left its window or period."""
        counters = self._counters.setdefault((partition, scope.name), _Counters())
        lo = now // 1000 - self._window_s + 1
        requests, request_buckets = _window(counters.requests, lo)
        tokens, token_buckets = _window(counters.tokens, lo)
        gone = now - RECORD_MARGIN_S * 1000
        for request_id in [r for r, expiry in counters.leases.items() if expiry <= gone]:
            del counters.leases[request_id]
        _drop_before(counters.day_tokens, period.oldest_day)
        _drop_before(counters.month_tokens, period.oldest_month)
        _drop_before(counters.month_spend, period.oldest_month)
        return _View(
            scope=scope,
            counters=counters,
            requests=requests,
            request_buckets=request_buckets,
            tokens=tokens,
            token_buckets=token_buckets,
            live_leases=sorted(expiry for expiry in counters.leases.values() if expiry > now),
            day_tokens=counters.day_tokens.get(period.day, 0),
            month_tokens=counters.month_tokens.get(period.month, 0),
            month_spend=counters.month_spend.get(period.month, 0),
        )

    def _refusal(
        self, views: list[_View], demand: Demand, now: int, period: _Period
    ) -> tuple[Dimension, str, int] | None:
        """The first limit the request fails, its scope and the ms until a retry can pass."""
        window_ms = self._window_s * 1000
        for dimension in _CHECK_ORDER:
            for view in views:
                limits = view.scope.limits
                wait: int | None = None
                if dimension is Dimension.MONTHLY_SPEND:
                    limit = limits.monthly_spend_nusd
                    if limit is not None and view.month_spend + demand.spend_nusd > limit:
                        wait = period.to_month_ms
                elif dimension is Dimension.MONTHLY_TOKENS:
                    limit = limits.monthly_tokens
                    if limit is not None and view.month_tokens + demand.tokens > limit:
                        wait = period.to_month_ms
                elif dimension is Dimension.DAILY_TOKENS:
                    limit = limits.daily_tokens
                    if limit is not None and view.day_tokens + demand.tokens > limit:
                        wait = period.to_day_ms
                elif dimension is Dimension.CONCURRENCY:
                    limit = limits.max_concurrency
                    if limit is not None and len(view.live_leases) + 1 > limit:
                        wait = min([1000, *(e - now for e in view.live_leases[:1])])
                elif dimension is Dimension.RPM:
                    limit = limits.rpm
                    if limit is not None and view.requests + 1 > limit:
                        need = view.requests + 1 - limit
                        wait = _free_after(view.request_buckets, need, window_ms, now)
                else:
                    limit = limits.tpm
                    if limit is not None and view.tokens + demand.tokens > limit:
                        need = view.tokens + demand.tokens - limit
                        wait = (
                            window_ms
                            if demand.tokens > limit
                            else _free_after(view.token_buckets, need, window_ms, now)
                        )
                if wait is not None:
                    return dimension, view.scope.name, wait
        return None

    def _reserve(
        self,
        key: tuple[str, str],
        views: list[_View],
        demand: Demand,
        now: int,
        period: _Period,
        lease_ms: int,
    ) -> None:
        second = now // 1000
        for view in views:
            counters = view.counters
            counters.requests[second] = counters.requests.get(second, 0) + 1
            counters.tokens[second] = counters.tokens.get(second, 0) + demand.tokens
            counters.leases[demand.request_id] = now + lease_ms
            days, months, spend = counters.day_tokens, counters.month_tokens, counters.month_spend
            days[period.day] = days.get(period.day, 0) + demand.tokens
            months[period.month] = months.get(period.month, 0) + demand.tokens
            spend[period.month] = spend.get(period.month, 0) + demand.spend_nusd
        record = _Reservation(
            scopes=tuple(view.scope.name for view in views),
            second=second,
            day=period.day,
            month=period.month,
            tokens=demand.tokens,
            spend_nusd=demand.spend_nusd,
            expires_ms=now + lease_ms + RECORD_MARGIN_S * 1000,
        )
        self._records[key] = record
        heapq.heappush(self._expiries, (record.expires_ms, _RECORD, *key))


def _period(now: int) -> _Period:
    days = now // _DAY_MS
    today = _EPOCH + dt.timedelta(days=days)
    next_month = dt.date(today.year + today.month // 12, today.month % 12 + 1, 1)
    oldest_month = _EPOCH + dt.timedelta(days=(now - _MONTH_KEEP * _DAY_MS) // _DAY_MS)
    return _Period(
        day=today.isoformat(),
        month=today.isoformat()[:7],
        to_day_ms=(days + 1) * _DAY_MS - now,
        to_month_ms=(next_month - _EPOCH).days * _DAY_MS - now,
        oldest_day=(today - dt.timedelta(days=_DAY_KEEP)).isoformat(),
        oldest_month=oldest_month.isoformat()[:7],
    )


def _window(buckets: dict[int, int], lo: int) -> tuple[int, list[tuple[int, int]]]:
    """Drop buckets before second ``lo``; the total left and the non-empty ones, oldest first."""
    for second in [s for s in buckets if s < lo]:
        del buckets[second]
    return sum(buckets.values()), sorted((s, v) for s, v in buckets.items() if v > 0)


def _free_after(buckets: list[tuple[int, int]], need: int, window_ms: int, now: int) -> int:
    """ms until ``need`` units have left the window, or the whole window if they never can."""
    freed = 0
    for second, value in buckets:
        freed += value
        if freed >= need:
            return (second * 1000 + window_ms) - now
    return window_ms


def _headers(
    scopes: list[tuple[int | None, int, list[tuple[int, int]]]],
    take: int,
    second: int,
    window_s: int,
    now: int,
) -> tuple[int | None, int | None, float | None]:
    """Limit, remaining and reset (s) of the scope with the least left, after ``take``."""
    best: tuple[int, int, list[tuple[int, int]]] | None = None
    for limit, used, buckets in scopes:
        if limit is None:
            continue
        left = max(0, limit - used - take)
        if best is None or left < best[1]:
            best = (limit, left, buckets)
    if best is None:
        return None, None, None
    limit, left, buckets = best
    oldest = buckets[0][0] if buckets else (second if take > 0 else None)
    reset_ms = 0 if oldest is None else (oldest + window_s) * 1000 - now
    return limit, left, reset_ms / 1000


def _drop_before(counters: dict[str, int], oldest: str) -> None:
    for label in [label for label in counters if label < oldest]:
        del counters[label]


def _add_existing(counters: dict[str, int], label: str, delta: int) -> None:
    if label in counters:
        counters[label] += delta
