"""The quota store interface: atomic admission and settlement across every gateway replica.

One admission checks every scope of a request (its tenant, its key) and either reserves on
all of them or on none. A reservation is settled once, to the real usage, when the request
ends, whatever way it ends; settling is idempotent, and settling a reservation the store never
made (or already settled) is a no-op that also stops a late admission of that request id.

Exceptions::

    QuotaStoreError
    └── StoreUnavailable      the store did not answer in time or refused the connection;
                              the caller decides whether to fail open or closed
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Sequence

import msgspec

__all__ = [
    "BUDGET_DIMENSIONS",
    "RATE_DIMENSIONS",
    "Decision",
    "Demand",
    "Dimension",
    "Limits",
    "QuotaStore",
    "QuotaStoreError",
    "Scope",
    "ScopeUsage",
    "StoreUnavailable",
]


class QuotaStoreError(Exception):
    """Base of the quota store's errors."""


class StoreUnavailable(QuotaStoreError):
    """The store is down, slow or unreachable; nothing is known about the outcome."""


class Dimension(enum.StrEnum):
    """One limit a scope can have."""

    RPM = "rpm"
    TPM = "tpm"
    CONCURRENCY = "max_concurrency"
    DAILY_TOKENS = "daily_tokens"
    MONTHLY_TOKENS = "monthly_tokens"
    MONTHLY_SPEND = "monthly_spend"


#: Rate limits: refill with time; a store outage follows the ``fail_open`` setting.
RATE_DIMENSIONS = frozenset({Dimension.RPM, Dimension.TPM, Dimension.CONCURRENCY})
#: Budgets: reset by calendar period (UTC); a store outage always fails closed.
BUDGET_DIMENSIONS = frozenset(
    {Dimension.DAILY_TOKENS, Dimension.MONTHLY_TOKENS, Dimension.MONTHLY_SPEND}
)


class Limits(msgspec.Struct, frozen=True, kw_only=True):
    """The limits of one scope; ``None`` means unlimited.

    Spend is in integer nano-USD (1e-9 USD) so that stores add it exactly.
    """

    rpm: int | None = None
    tpm: int | None = None
    max_concurrency: int | None = None
    daily_tokens: int | None = None
    monthly_tokens: int | None = None
    monthly_spend_nusd: int | None = None

    def is_unlimited(self) -> bool:
        return all(v is None for v in msgspec.structs.astuple(self))

    def has_budget(self) -> bool:
        return (
            self.daily_tokens is not None
            or self.monthly_tokens is not None
            or self.monthly_spend_nusd is not None
        )


class Scope(msgspec.Struct, frozen=True):
    """Something counted against: a tenant or one key, with its limits.

    ``name`` is unique in the store, e.g. ``tenant:ten_123`` or ``key:key_456``.
    """

    name: str
    limits: Limits


class Demand(msgspec.Struct, frozen=True, kw_only=True):
    """What one request reserves at admission: the most it can use."""

    request_id: str
    tokens: int
    spend_nusd: int = 0


class Decision(msgspec.Struct, kw_only=True):
    """The outcome of one admission and the figures for the ``x-ratelimit-*`` headers.

    The header figures describe the tightest scope that has the limit (the smallest
    remaining); ``None`` where no scope limits that dimension. ``remaining_*`` count what
    is left after this request, when it was admitted.
    """

    admitted: bool
    #: The limit that refused the request (``None`` when admitted) and its scope's name.
    dimension: Dimension | None = None
    scope: str | None = None
    #: Seconds until a retry can succeed, when refused.
    retry_after_s: float | None = None
    limit_requests: int | None = None
    remaining_requests: int | None = None
    reset_requests_s: float | None = None
    limit_tokens: int | None = None
    remaining_tokens: int | None = None
    reset_tokens_s: float | None = None


class ScopeUsage(msgspec.Struct, kw_only=True):
    """What a scope holds right now (reserved plus settled)."""

    requests_in_window: int = 0
    tokens_in_window: int = 0
    in_flight: int = 0
    daily_tokens: int = 0
    monthly_tokens: int = 0
    monthly_spend_nusd: int = 0
    #: Reservations not yet settled that name this scope.
    open_reservations: int = 0


class QuotaStore(abc.ABC):
    """Counters shared by every replica; each call is one atomic step in the store.

    Windows: requests and tokens per minute are counted in one-second buckets over the last
    ``window_s`` seconds (60 in production); daily and monthly budgets by UTC calendar day
    and month, taken from the store's own clock. A reservation settles against the buckets
    and periods it was made in.
    """

    @abc.abstractmethod
    async def admit(
        self, partition: str, scopes: Sequence[Scope], demand: Demand, lease_s: float
    ) -> Decision:
        """Check every scope and reserve on all of them, or on none.

        ``partition`` groups the scopes of one tenant (a Redis hash tag); settle with the
        same one. ``lease_s`` bounds how long the concurrency slot is held if the request is
        never settled (its replica died); the reservation record outlives it by a margin
        (five minutes), so that a late settle still corrects the counters, and then expires.
        Admitting a ``request_id`` that was already settled or released, or that has an open
        reservation, is refused (``admitted=False``, ``dimension=None``) and reserves nothing.

        Raises:
            StoreUnavailable: the store did not answer; the outcome is unknown, so the caller
                must release ``demand.request_id`` once the store is back.
        """

    @abc.abstractmethod
    async def settle(self, partition: str, request_id: str, tokens: int, spend_nusd: int) -> bool:
        """Replace the reservation of ``request_id`` with the real usage and free its slot.

        Requests stay counted in the request window; tokens and spend are corrected by
        ``real - reserved`` on every counter the reservation touched. Returns ``False`` when
        there was no open reservation (never made, already settled, or expired): nothing
        changes then, except that a later admission of the id is refused.

        Raises:
            StoreUnavailable: the store did not answer; retrying is safe.
        """

    async def release(self, partition: str, request_id: str) -> bool:
        """Settle with zero usage: the request never reached the engine."""
        return await self.settle(partition, request_id, 0, 0)

    @abc.abstractmethod
    async def usage(self, partition: str, scope: str) -> ScopeUsage:
        """What ``scope`` holds now (for the admin API and tests)."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise StoreUnavailable unless the store answers."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections."""
