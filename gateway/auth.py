"""Who is calling: the operator (``TOLLGATE_ADMIN_TOKEN``) or an API key of a tenant.

One middleware authenticates every route but the health checks and leaves the principal in
``request.user``. What a key lookup costs the accounts database, and what happens when the
database fails:

- A key found is trusted for ``key_cache_s`` (1 s by default), so while the database answers
  a revoked key stops working on every replica within that.
- A lookup in flight is shared by every request that needs the same key, so a burst on a
  cold cache makes one lookup, not hundreds.
- A well-formed key that is not found (made up, revoked, its tenant deleted) is remembered as
  such for ``key_unknown_cache_s``, in an LRU of its own: the same made-up key sent a
  thousand times costs one lookup, and made-up keys never push known keys out of the cache.
- Distinct made-up keys cannot be told from new real keys before the database answers, so
  each costs a lookup. What bounds them is a limit on lookups at once
  (``key_lookup_concurrency``), of which keys not in the cache may hold at most half: a
  flood of made-up keys queues for its half, each waits at most ``key_lookup_timeout_ms``
  and then gets 503, and refreshes of known keys keep the other half, so a flood neither
  reaches the database beyond that bound nor keeps revocations from being seen. Turning such
  a flood away (limits per client address) belongs in front of the gateway.
- A request waits at most ``key_lookup_timeout_ms`` for a lookup, a free slot included. The
  lookup's thread cannot be stopped: the lookup carries on, keeps its slot and stays shared
  until the database answers, and a late answer still fills the cache.

When a lookup fails (a database error, or no answer in time), a key found within the last
``key_stale_s`` seconds keeps working from the cache, and the database is asked about it
again at most once every ``key_cache_s``; any other key gets 503 ``accounts_unavailable``
with ``retry-after``, never a 500 and never the driver's text. Stale entries serve only
while lookups fail, and the price is stated plainly: a key revoked just before or during an
outage keeps working for up to ``key_stale_s`` on replicas that had it cached.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, TypeAlias

import msgspec
from litestar.connection import ASGIConnection
from litestar.middleware import AbstractAuthenticationMiddleware, AuthenticationResult
from sqlalchemy.exc import SQLAlchemyError

from gateway.db import AccountStore, QuotaPolicy
from gateway.errors import ServiceUnavailable, Unauthenticated
from gateway.keys import is_well_formed, key_digest
from gateway.quotas import Limits

__all__ = ["AuthMiddleware", "Authenticator", "Principal", "limits_of", "principal_of"]

logger = logging.getLogger(__name__)

_NANO = Decimal(10) ** 9
_RETRY_AFTER_S = "1"
#: A database that keeps failing and recovering is logged about at most this often.
_WARN_EVERY_S = 60.0


class Principal(msgspec.Struct, frozen=True, kw_only=True):
    """The caller of one request, with the limits that apply to it."""

    operator: bool = False
    tenant_id: str | None = None
    key_id: str | None = None
    role: str = "user"
    #: Models this key may use; ``None`` means every model.
    models: frozenset[str] | None = None
    expires_at: datetime | None = None
    tenant_limits: Limits = Limits()
    key_limits: Limits = Limits()

    @property
    def is_admin(self) -> bool:
        return self.operator or self.role == "admin"

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models


OPERATOR = Principal(operator=True, role="admin")


def limits_of(policy: QuotaPolicy | None) -> Limits:
    """A stored quota policy as store limits (spend in integer nano-USD, rounded down)."""
    if policy is None:
        return Limits()
    spend = policy.monthly_spend_usd
    return Limits(
        rpm=policy.rpm,
        tpm=policy.tpm,
        max_concurrency=policy.max_concurrency,
        daily_tokens=policy.daily_tokens,
        monthly_tokens=policy.monthly_tokens,
        monthly_spend_nusd=None if spend is None else int(Decimal(spend) * _NANO),
    )


class _Known(msgspec.Struct):
    """A key found in the database, as it was when its lookup began."""

    principal: Principal
    #: When the lookup began (the authenticator's clock).
    loaded: float
    #: The `Authenticator.forget` generation the lookup began in.
    generation: int
    #: After a failed refresh: serve this entry without asking the database until then.
    retry_at: float = 0.0


class _Failure(msgspec.Struct, frozen=True):
    """Why a lookup gave no answer: the database failed, or no slot freed up in time."""

    reason: str


_BUSY = _Failure("every lookup slot stayed taken")
#: What a lookup ends with: the key's principal, ``None`` (not found), or why there is none.
_Answer: TypeAlias = Principal | _Failure | None


class _Flight(msgspec.Struct):
    """One database lookup of one key, shared by every request that needs it."""

    task: asyncio.Task[_Answer]
    #: When waiting for it stops (the event loop's clock).
    deadline: float


class Authenticator:
    """Turns an ``Authorization`` header into a principal, or raises 401 (or 503).

    Args:
        accounts: The accounts store keys are looked up in.
        secret: The deployment's secret that keys are hashed under.
        admin_token: The operator's token.
        cache_s: How long a key found is trusted while the database answers.
        cache_size: How many keys found are kept (least recently used go first).
        stale_s: How long after its lookup a key found keeps working while the database
            fails; ``0`` turns stale answers off.
        unknown_cache_s: How long a key not found is remembered as not found.
        unknown_cache_size: How many keys not found are remembered.
        lookup_timeout_s: How long a request waits for a lookup, a free slot included.
        max_lookups: The most lookups in the database at once; lookups of keys not in the
            cache hold at most half of them (at least one).
        clock: The clock cache entries age by.

    Raises:
        ValueError: a negative duration or size, a timeout or a lookup limit below the
            smallest that works.
    """

    def __init__(
        self,
        accounts: AccountStore,
        *,
        secret: bytes,
        admin_token: str,
        cache_s: float = 1.0,
        cache_size: int = 10_000,
        stale_s: float = 300.0,
        unknown_cache_s: float = 5.0,
        unknown_cache_size: int = 100_000,
        lookup_timeout_s: float = 2.0,
        max_lookups: int = 4,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if min(cache_s, stale_s, unknown_cache_s, cache_size, unknown_cache_size) < 0:
            raise ValueError("cache durations and sizes must not be negative")
        if lookup_timeout_s <= 0 or max_lookups < 1:
            raise ValueError("the lookup timeout must be positive and max_lookups at least 1")
        self._accounts = accounts
        self._secret = secret
        self._admin = admin_token.encode()
        self._cache_s = cache_s
        self._cache_size = cache_size
        self._stale_s = stale_s
        self._unknown_s = unknown_cache_s
        self._unknown_size = unknown_cache_size
        self._timeout_s = lookup_timeout_s
        self._clock = clock
        self._generation = 0
        self._cache: OrderedDict[str, _Known] = OrderedDict()
        #: Digests not found, each with the time its entry expires.
        self._unknown: OrderedDict[str, float] = OrderedDict()
        self._inflight: dict[str, _Flight] = {}
        self._flights: set[asyncio.Task[_Answer]] = set()
        self._slots = asyncio.Semaphore(max_lookups)
        self._cold_slots = asyncio.Semaphore(max(1, max_lookups // 2))
        self._failing = False
        self._warned_at = -_WARN_EVERY_S

    async def authenticate(self, authorization: str | None) -> Principal:
        """The caller behind ``Authorization: Bearer <token>``.

        Raises:
            Unauthenticated: no token, or one that is malformed, unknown, revoked or expired.
                The message never repeats the token.
            ServiceUnavailable: the accounts database failed or did not answer in time, and
                the key was not found within the last ``stale_s`` seconds.
        """
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated(
                "You didn't provide an API key. Send it as `Authorization: Bearer <key>`."
            )
        if hmac.compare_digest(token.encode(), self._admin):
            return OPERATOR
        if not is_well_formed(token):
            raise Unauthenticated("Incorrect API key provided.")
        principal = await self._lookup(key_digest(token, self._secret))
        if principal is None:
            raise Unauthenticated("Incorrect API key provided.")
        if principal.expires_at is not None and principal.expires_at <= datetime.now(UTC):
            raise Unauthenticated("This API key has expired.", code="expired_api_key")
        return principal

    def forget(self) -> None:
        """Stop trusting every cached lookup (this replica changed a key or a quota).

        Keys found stay cached as a stale fallback, used only while the database fails.
        """
        self._generation += 1
        self._unknown.clear()
        # Lookups that began before the change may answer from before it: let new requests
        # start their own. The old ones still finish, and hold their slots until they do.
        self._inflight.clear()

    async def _lookup(self, digest: str) -> Principal | None:
        now = self._clock()
        known = self._cache.get(digest)
        if known is not None:
            if known.generation == self._generation and now < known.loaded + self._cache_s:
                return known.principal
            if now < known.retry_at and self._usable(known, now):
                return known.principal  # the database failed moments ago
        unknown_until = self._unknown.get(digest)
        if unknown_until is not None and now < unknown_until:
            return None
        flight = self._inflight.get(digest)
        if flight is None:
            flight = self._launch(digest, seen=known is not None, now=now)
        result = await self._wait(flight)
        if not isinstance(result, _Failure):
            return result
        now = self._clock()
        known = self._cache.get(digest)
        if known is not None and self._usable(known, now):
            known.retry_at = now + self._cache_s
            return known.principal
        raise ServiceUnavailable(
            "API keys cannot be checked right now; please retry shortly.",
            code="accounts_unavailable",
            headers={"retry-after": _RETRY_AFTER_S},
        )

    def _usable(self, known: _Known, now: float) -> bool:
        return now < known.loaded + self._stale_s

    def _launch(self, digest: str, *, seen: bool, now: float) -> _Flight:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout_s
        task = loop.create_task(self._fly(digest, seen=seen, began=now, deadline=deadline))
        self._flights.add(task)
        task.add_done_callback(self._landed)
        flight = _Flight(task=task, deadline=deadline)
        self._inflight[digest] = flight
        return flight

    def _landed(self, task: asyncio.Task[_Answer]) -> None:
        self._flights.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved here; the requests waiting on it re-raise it

    async def _wait(self, flight: _Flight) -> _Answer:
        try:
            async with asyncio.timeout_at(flight.deadline):
                return await asyncio.shield(flight.task)
        except TimeoutError:
            self._note_failure("no answer in time")
            return _Failure("no answer in time")

    async def _fly(self, digest: str, *, seen: bool, began: float, deadline: float) -> _Answer:
        generation = self._generation
        held: list[asyncio.Semaphore] = []
        try:
            try:
                async with asyncio.timeout_at(deadline):
                    for slots in (self._slots,) if seen else (self._cold_slots, self._slots):
                        await slots.acquire()
                        held.append(slots)
            except TimeoutError:
                return _BUSY
            try:
                principal = await self._load(digest)
            except (SQLAlchemyError, OSError) as exc:
                # The driver's text may name hosts, databases and the query: not logged.
                self._note_failure(type(exc).__name__)
                return _Failure(type(exc).__name__)
        finally:
            for slots in held:
                slots.release()
            flight = self._inflight.get(digest)
            if flight is not None and flight.task is asyncio.current_task():
                del self._inflight[digest]
        self._note_recovery()
        self._remember(digest, principal, began, generation)
        return principal

    def _remember(
        self, digest: str, principal: Principal | None, began: float, generation: int
    ) -> None:
        if principal is None:
            self._cache.pop(digest, None)
            self._unknown[digest] = began + self._unknown_s
            self._unknown.move_to_end(digest)
            while len(self._unknown) > self._unknown_size:
                self._unknown.popitem(last=False)
            return
        self._unknown.pop(digest, None)
        current = self._cache.get(digest)
        if current is not None and current.loaded > began:
            return  # a lookup that began later has answered already
        self._cache[digest] = _Known(principal=principal, loaded=began, generation=generation)
        self._cache.move_to_end(digest)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    def _note_failure(self, reason: str) -> None:
        now = time.monotonic()
        if not self._failing and now - self._warned_at >= _WARN_EVERY_S:
            self._failing, self._warned_at = True, now
            logger.warning(
                "key lookups failing (%s): keys found in the last %g s are served from the "
                "cache, others get 503",
                reason,
                self._stale_s,
            )

    def _note_recovery(self) -> None:
        if self._failing:
            self._failing = False
            logger.info("key lookups answer again")

    async def _load(self, digest: str) -> Principal | None:
        found = await self._accounts.find_key(digest)
        if found is None:
            return None
        key, tenant = found
        if key.revoked_at is not None or tenant.deleted_at is not None:
            return None
        tenant_policy, key_policy = await self._accounts.quotas_for(tenant.id, key.id)
        return Principal(
            tenant_id=tenant.id,
            key_id=key.id,
            role=key.role,
            models=frozenset(key.models) if key.models is not None else None,
            expires_at=key.expires_at,
            tenant_limits=limits_of(tenant_policy),
            key_limits=limits_of(key_policy),
        )


class AuthMiddleware(AbstractAuthenticationMiddleware):
    """Authenticates every request it covers; the principal lands in ``request.user``."""

    def __init__(self, app: Any, authenticator: Authenticator, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.authenticator = authenticator

    async def authenticate_request(self, connection: ASGIConnection[Any, Any, Any, Any]) -> Any:
        principal = await self.authenticator.authenticate(connection.headers.get("authorization"))
        return AuthenticationResult(user=principal, auth=None)


def principal_of(scope: Any) -> Principal | None:
    """The authenticated caller, or ``None`` when authentication is off."""
    user = scope.get("user")
    return user if isinstance(user, Principal) else None
