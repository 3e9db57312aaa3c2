"""Who is calling: the operator (``TOLLGATE_ADMIN_TOKEN``) or an API key of a tenant.

One middleware authenticates every route but the health checks and leaves the principal in
``request.user``. Key lookups are cached in process for ``key_cache_s`` (1 s by default), so a
revoked key stops working on every replica within that; a lookup in flight is shared by every
request that needs it, so a burst on a cold cache makes one database query, not hundreds.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import msgspec
from litestar.connection import ASGIConnection
from litestar.middleware import AbstractAuthenticationMiddleware, AuthenticationResult

from gateway.db import AccountStore, QuotaPolicy
from gateway.errors import Unauthenticated
from gateway.keys import is_well_formed, key_digest
from gateway.quotas import Limits

__all__ = ["AuthMiddleware", "Authenticator", "Principal", "limits_of", "principal_of"]

_NANO = Decimal(10) ** 9


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


class _Entry(msgspec.Struct):
    until: float
    principal: Principal | None


class Authenticator:
    """Turns an ``Authorization`` header into a principal, or raises 401."""

    def __init__(
        self,
        accounts: AccountStore,
        *,
        secret: bytes,
        admin_token: str,
        cache_s: float = 1.0,
        cache_size: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._accounts = accounts
        self._secret = secret
        self._admin = admin_token.encode()
        self._cache_s = cache_s
        self._cache_size = cache_size
        self._clock = clock
        self._cache: OrderedDict[str, _Entry] = OrderedDict()
        self._inflight: dict[str, asyncio.Future[Principal | None]] = {}

    async def authenticate(self, authorization: str | None) -> Principal:
        """The caller behind ``Authorization: Bearer <token>``.

        Raises:
            Unauthenticated: no token, or one that is malformed, unknown, revoked or expired.
                The message never repeats the token.
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
        """Drop every cached lookup (this replica changed a key or a quota)."""
        self._cache.clear()

    async def _lookup(self, digest: str) -> Principal | None:
        now = self._clock()
        entry = self._cache.get(digest)
        if entry is not None and entry.until > now:
            return entry.principal
        pending = self._inflight.get(digest)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[Principal | None] = asyncio.get_running_loop().create_future()
        self._inflight[digest] = future
        try:
            principal = await self._load(digest)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # consumed here; waiters re-raise it
            raise
        else:
            future.set_result(principal)
            self._remember(digest, principal, now)
            return principal
        finally:
            del self._inflight[digest]

    def _remember(self, digest: str, principal: Principal | None, now: float) -> None:
        self._cache[digest] = _Entry(until=now + self._cache_s, principal=principal)
        self._cache.move_to_end(digest)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

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
