"""The accounts store: tenants, their API keys and their quota policies, over SQLAlchemy.

The methods are coroutines; each runs one short transaction on a worker thread
(`asyncio.to_thread`) over a synchronous engine (psycopg 3 or sqlite3), and returns plain
detached objects that stay usable after it. Nothing is deleted for real: deleting a tenant
marks it and revokes its keys, revoking a key marks it, so usage can always name both.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, TypeVar

from sqlalchemy import Engine, or_, text, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from gateway.db.errors import Conflict, InvalidValue, NotFound
from gateway.db.tables import (
    NAME_MAX_LENGTH,
    QUOTA_LIMITS,
    ROLES,
    ApiKey,
    CatalogSeed,
    DeployedModel,
    QuotaPolicy,
    ServingPolicyRow,
    Tenant,
)
from gateway.db.types import to_money, utcnow
from gateway.db.url import SQLITE_WRITE_OPTION, make_engine
from gateway.keys import generate_key, key_digest, key_hint

__all__ = ["AccountStore"]

_T = TypeVar("_T")
_INT32_MAX = 2**31 - 1
_INT64_MAX = 2**63 - 1
#: The largest value each integer limit's column holds.
_INT_LIMITS = {
    "rpm": _INT32_MAX,
    "tpm": _INT64_MAX,
    "max_concurrency": _INT32_MAX,
    "daily_tokens": _INT64_MAX,
    "monthly_tokens": _INT64_MAX,
}


class AccountStore:
    """Tenants, API keys and quota policies in one SQL database.

    Methods raise the `AccountError` subclasses of `gateway.db.errors`; a database that is
    down or unreachable raises SQLAlchemy's `OperationalError` as it is.

    Args:
        engine: An engine from `make_engine`; the store disposes of it in `close`.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        # SQLite: transactions that write take the write lock up front (see the option).
        self._writer = engine.execution_options(**{SQLITE_WRITE_OPTION: True})

    @classmethod
    def from_url(cls, url: str) -> AccountStore:
        """A store over a new engine for ``url`` (any form `normalize_url` takes)."""
        return cls(make_engine(url))

    @property
    def engine(self) -> Engine:
        """The engine the store runs on."""
        return self._engine

    async def close(self) -> None:
        """Closes every pooled connection."""
        await asyncio.to_thread(self._engine.dispose)

    async def _run(self, work: Callable[[Session], _T], *, write: bool = False) -> _T:
        def run() -> _T:
            bind = self._writer if write else self._engine
            with Session(bind, expire_on_commit=False) as session:
                try:
                    with session.begin():
                        return work(session)
                except IntegrityError as exc:
                    raise Conflict("the change conflicts with a stored row") from exc

        return await asyncio.to_thread(run)

    # Tenants

    async def create_tenant(self, name: str) -> Tenant:
        """A new tenant named ``name``.

        Raises:
            InvalidValue: the name is empty or longer than 200 characters.
        """
        tenant = Tenant(name=_check_name(name, "tenant name"))

        def work(session: Session) -> Tenant:
            session.add(tenant)
            return tenant

        return await self._run(work, write=True)

    async def list_tenants(self, *, tenant_id: str | None = None) -> list[Tenant]:
        """Every tenant not deleted, oldest first; only ``tenant_id`` when given."""

        def work(session: Session) -> list[Tenant]:
            query = select(Tenant).where(col(Tenant.deleted_at).is_(None))
            if tenant_id is not None:
                query = query.where(Tenant.id == tenant_id)
            return list(session.exec(query.order_by(col(Tenant.created_at), col(Tenant.id))))

        return await self._run(work)

    async def get_tenant(self, tenant_id: str) -> Tenant:
        """The tenant ``tenant_id``.

        Raises:
            NotFound: no such tenant, or it was deleted.
        """
        return await self._run(lambda session: _live_tenant(session, tenant_id))

    async def rename_tenant(self, tenant_id: str, name: str) -> Tenant:
        """Renames the tenant ``tenant_id`` and returns it.

        Raises:
            NotFound: no such tenant, or it was deleted.
            InvalidValue: the name is empty or longer than 200 characters.
        """
        name = _check_name(name, "tenant name")

        def work(session: Session) -> Tenant:
            tenant = _live_tenant(session, tenant_id, lock=True)
            tenant.name = name
            return tenant

        return await self._run(work, write=True)

    async def delete_tenant(self, tenant_id: str) -> None:
        """Deletes the tenant ``tenant_id`` and revokes its keys; its rows stay for billing.

        Raises:
            NotFound: no such tenant, or it was deleted already.
        """

        def work(session: Session) -> None:
            tenant = _live_tenant(session, tenant_id, lock=True)
            now = utcnow()
            tenant.deleted_at = now
            session.exec(
                update(ApiKey)
                .where(col(ApiKey.tenant_id) == tenant_id, col(ApiKey.revoked_at).is_(None))
                .values(revoked_at=now)
            )

        await self._run(work, write=True)

    async def is_empty(self) -> bool:
        """Whether no tenant was ever created (deleted tenants count as created)."""

        def work(session: Session) -> bool:
            return session.exec(select(Tenant.id).limit(1)).first() is None

        return await self._run(work)

    # Keys

    async def create_key(
        self,
        tenant_id: str,
        *,
        name: str,
        role: str = "user",
        models: Sequence[str] | None = None,
        expires_at: datetime | None = None,
        secret: bytes,
    ) -> tuple[ApiKey, str]:
        """A new API key for the tenant ``tenant_id``, and the key itself.

        The key is returned this once and never stored: only its HMAC under ``secret``.

        Args:
            tenant_id: The tenant that owns the key.
            name: What the key is for, for people (1 to 200 characters).
            role: ``user``, or ``admin`` for a key that may also call the admin API.
            models: The only models the key may use; ``None`` for every model.
            expires_at: When the key stops working (timezone-aware); ``None`` for never.
            secret: The deployment's secret that keys are hashed under.

        Raises:
            NotFound: no such tenant, or it was deleted.
            InvalidValue: a malformed name, role, model list, expiry or secret.
        """
        if role not in ROLES:
            raise InvalidValue(f"role must be one of {', '.join(ROLES)}, not {role!r}")
        if not isinstance(secret, bytes) or not secret:
            raise InvalidValue("the secret keys are hashed under must be non-empty bytes")
        plaintext = generate_key()
        prefix, last4 = key_hint(plaintext)
        key = ApiKey(
            tenant_id=tenant_id,
            name=_check_name(name, "key name"),
            role=role,
            digest=key_digest(plaintext, secret),
            prefix=prefix,
            last4=last4,
            models=_check_models(models),
            expires_at=_check_aware(expires_at, "expires_at"),
        )

        def work(session: Session) -> ApiKey:
            _live_tenant(session, tenant_id, lock=True)
            session.add(key)
            return key

        return await self._run(work, write=True), plaintext

    async def list_keys(self, tenant_id: str) -> list[ApiKey]:
        """Every key of the tenant ``tenant_id``, revoked ones included, oldest first.

        Raises:
            NotFound: no such tenant, or it was deleted.
        """

        def work(session: Session) -> list[ApiKey]:
            _live_tenant(session, tenant_id)
            query = (
                select(ApiKey)
                .where(ApiKey.tenant_id == tenant_id)
                .order_by(col(ApiKey.created_at), col(ApiKey.id))
            )
            return list(session.exec(query))

        return await self._run(work)

    async def get_key(self, key_id: str) -> ApiKey:
        """The key ``key_id`` (its stored fields; the key itself is not kept).

        Raises:
            NotFound: no such key.
        """
        return await self._run(lambda session: _key(session, key_id))

    async def revoke_key(self, key_id: str) -> ApiKey:
        """Revokes the key ``key_id`` and returns it; revoking it again changes nothing.

        Raises:
            NotFound: no such key.
        """

        def work(session: Session) -> ApiKey:
            key = _key(session, key_id, lock=True)
            if key.revoked_at is None:
                key.revoked_at = utcnow()
            return key

        return await self._run(work, write=True)

    async def find_key(self, digest: str) -> tuple[ApiKey, Tenant] | None:
        """The key whose digest is ``digest`` and its tenant, in one indexed query.

        Revoked and expired keys and deleted tenants are returned too: the caller tells
        the client why the key no longer works.
        """

        def work(session: Session) -> tuple[ApiKey, Tenant] | None:
            query = (
                select(ApiKey, Tenant)
                .join(Tenant, col(ApiKey.tenant_id) == col(Tenant.id))
                .where(ApiKey.digest == digest)
            )
            row = session.exec(query).first()
            return None if row is None else (row[0], row[1])

        return await self._run(work)

    # Quotas

    async def get_quota(self, tenant_id: str, key_id: str | None = None) -> QuotaPolicy | None:
        """The policy of the tenant (``key_id`` is ``None``) or of its key; ``None`` if unset."""

        def work(session: Session) -> QuotaPolicy | None:
            query = select(QuotaPolicy).where(QuotaPolicy.tenant_id == tenant_id, _key_is(key_id))
            return session.exec(query).first()

        return await self._run(work)

    async def set_quota(
        self, tenant_id: str, key_id: str | None, **fields: int | Decimal | None
    ) -> QuotaPolicy:
        """Sets limits on the tenant (``key_id`` is ``None``) or on one of its keys.

        The policy is created when there is none. Only the limits given change; a new
        policy starts with every limit unset (unlimited).

        Args:
            tenant_id: The tenant.
            key_id: One of the tenant's keys, or ``None`` for the tenant's own policy.
            **fields: Any of ``rpm``, ``tpm``, ``max_concurrency``, ``daily_tokens``,
                ``monthly_tokens`` (non-negative integers) and ``monthly_spend_usd`` (a
                non-negative `Decimal` with at most 6 places); ``None`` means unlimited.

        Raises:
            NotFound: no such tenant (or it was deleted), or the key is not the tenant's.
            InvalidValue: an unknown limit, or a value of the wrong type or out of range.
        """
        limits = _check_limits(fields)

        def work(session: Session) -> QuotaPolicy:
            _live_tenant(session, tenant_id, lock=True)
            if key_id is not None:
                key = session.get(ApiKey, key_id)
                if key is None or key.tenant_id != tenant_id:
                    raise NotFound(f"tenant {tenant_id!r} has no key {key_id!r}")
            changes: dict[str, Any] = {**limits, "updated_at": utcnow()}
            row = {"tenant_id": tenant_id, "key_id": key_id, **changes}
            if key_id is None:
                target: dict[str, Any] = {
                    "index_elements": ["tenant_id"],
                    "index_where": text("key_id IS NULL"),
                }
            else:
                target = {"index_elements": ["tenant_id", "key_id"]}
            statement: Any
            if session.get_bind().dialect.name == "postgresql":
                statement = postgresql_insert(QuotaPolicy).values(row)
            else:
                statement = sqlite_insert(QuotaPolicy).values(row)
            statement = statement.on_conflict_do_update(**target, set_=changes).returning(
                QuotaPolicy
            )
            result = session.exec(statement, execution_options={"populate_existing": True})
            policy: QuotaPolicy = result.scalars().one()
            return policy

        return await self._run(work, write=True)

    async def quotas_for(
        self, tenant_id: str, key_id: str | None
    ) -> tuple[QuotaPolicy | None, QuotaPolicy | None]:
        """The tenant's own policy and the key's (``None`` where unset), in one query."""

        def work(session: Session) -> tuple[QuotaPolicy | None, QuotaPolicy | None]:
            query = select(QuotaPolicy).where(
                QuotaPolicy.tenant_id == tenant_id,
                or_(col(QuotaPolicy.key_id).is_(None), _key_is(key_id)),
            )
            tenant_policy = key_policy = None
            for policy in session.exec(query):
                if policy.key_id is None:
                    tenant_policy = policy
                else:
                    key_policy = policy
            return tenant_policy, key_policy

        return await self._run(work)

    # The serving policy

    async def get_serving_policy(self) -> tuple[int, str]:
        """The serving policy document and its version (``(0, "{}")`` before the first)."""

        def work(session: Session) -> tuple[int, str]:
            row = session.get(ServingPolicyRow, 1)
            return (0, "{}") if row is None else (row.version, row.document)

        return await self._run(work)

    async def set_serving_policy(self, document: str, expected_version: int) -> int:
        """Store a new serving policy made from version ``expected_version``; its version.

        Raises:
            Conflict: another change was stored since ``expected_version``.
        """

        def work(session: Session) -> int:
            row = session.get(ServingPolicyRow, 1, with_for_update=True)
            if row is None:
                if expected_version != 0:
                    raise Conflict("the serving policy changed meanwhile; read it again")
                session.add(ServingPolicyRow(id=1, version=1, document=document))
                return 1
            if row.version != expected_version:
                raise Conflict("the serving policy changed meanwhile; read it again")
            row.version += 1
            row.document = document
            row.updated_at = utcnow()
            session.add(row)
            return row.version

        return await self._run(work, write=True)

    # The deployed catalog

    async def seed_catalog(self, deployment: str, digest: str, specs: dict[str, str]) -> bool:
        """Store the entries of a models file unless this same file (``digest``) seeded the
        deployment before; whether it did now. The file's entries replace stored ones of the
        same names; entries an earlier file put there and this one lacks go; entries made
        through the admin API and absent from the file stay."""

        def work(session: Session) -> bool:
            seed = session.get(CatalogSeed, deployment, with_for_update=True)
            if seed is not None and seed.digest == digest:
                return False
            stale = session.exec(
                select(DeployedModel).where(
                    DeployedModel.deployment == deployment, DeployedModel.origin == "file"
                )
            ).all()
            for row in stale:
                if row.name not in specs:
                    session.delete(row)
            for name, spec in specs.items():
                _put_model(session, deployment, name, spec, origin="file")
            if seed is None:
                session.add(CatalogSeed(deployment=deployment, digest=digest))
            else:
                seed.digest, seed.seeded_at = digest, utcnow()
                session.add(seed)
            return True

        return await self._run(work, write=True)

    async def deployed_models(self, deployment: str) -> list[tuple[str, int, str]]:
        """``(name, version, spec)`` of every model of the deployment."""

        def work(session: Session) -> list[tuple[str, int, str]]:
            rows = session.exec(
                select(DeployedModel).where(DeployedModel.deployment == deployment)
            ).all()
            return sorted((row.name, row.version, row.spec) for row in rows)

        return await self._run(work)

    async def put_model(self, deployment: str, name: str, spec: str) -> tuple[int, bool]:
        """Store a model's entry; its version and whether it is new."""

        def work(session: Session) -> tuple[int, bool]:
            return _put_model(session, deployment, name, spec, origin="api")

        return await self._run(work, write=True)

    async def delete_model(self, deployment: str, name: str) -> bool:
        """Remove a model's entry; whether there was one."""

        def work(session: Session) -> bool:
            row = session.get(DeployedModel, (deployment, name), with_for_update=True)
            if row is None:
                return False
            session.delete(row)
            return True

        return await self._run(work, write=True)


def _put_model(
    session: Session, deployment: str, name: str, spec: str, *, origin: str
) -> tuple[int, bool]:
    row = session.get(DeployedModel, (deployment, name), with_for_update=True)
    if row is None:
        session.add(
            DeployedModel(deployment=deployment, name=name, version=1, spec=spec, origin=origin)
        )
        return 1, True
    if row.spec != spec or row.origin != origin:
        row.version += row.spec != spec
        row.spec, row.origin, row.updated_at = spec, origin, utcnow()
        session.add(row)
    return row.version, False


def _live_tenant(session: Session, tenant_id: str, *, lock: bool = False) -> Tenant:
    # Writers lock the row (PostgreSQL; SQLite has one writer at a time anyway), so that a
    # key cannot be added to a tenant while it is being deleted.
    tenant = session.get(Tenant, tenant_id, with_for_update=lock)
    if tenant is None or tenant.deleted_at is not None:
        raise NotFound(f"no tenant {tenant_id!r}")
    return tenant


def _key(session: Session, key_id: str, *, lock: bool = False) -> ApiKey:
    key = session.get(ApiKey, key_id, with_for_update=lock)
    if key is None:
        raise NotFound(f"no key {key_id!r}")
    return key


def _key_is(key_id: str | None) -> Any:
    column = col(QuotaPolicy.key_id)
    return column.is_(None) if key_id is None else column == key_id


def _check_name(name: object, what: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise InvalidValue(f"{what} must be a non-empty string")
    name = name.strip()
    if len(name) > NAME_MAX_LENGTH:
        raise InvalidValue(f"{what} is longer than {NAME_MAX_LENGTH} characters")
    return name


def _check_models(models: Sequence[str] | None) -> list[str] | None:
    if models is None:
        return None
    if isinstance(models, str) or not all(isinstance(m, str) and m for m in models):
        raise InvalidValue("models must be a list of model names, or null for every model")
    unique = list(dict.fromkeys(models))
    if not unique:
        raise InvalidValue("models must name at least one model, or be null for every model")
    return unique


def _check_aware(moment: datetime | None, what: str) -> datetime | None:
    if moment is None:
        return None
    if not isinstance(moment, datetime) or moment.utcoffset() is None:
        raise InvalidValue(f"{what} must be a timezone-aware datetime")
    return moment.astimezone(UTC)


def _check_limits(fields: Mapping[str, object]) -> dict[str, int | Decimal | None]:
    unknown = sorted(set(fields) - set(QUOTA_LIMITS))
    if unknown:
        raise InvalidValue(f"unknown limits {', '.join(unknown)}: use {', '.join(QUOTA_LIMITS)}")
    checked: dict[str, int | Decimal | None] = {}
    for name, value in fields.items():
        if value is None:
            checked[name] = None
        elif name == "monthly_spend_usd":
            try:
                amount = to_money(value)
            except (TypeError, ValueError) as exc:
                raise InvalidValue(f"monthly_spend_usd: {exc}") from None
            if amount < 0:
                raise InvalidValue("monthly_spend_usd must not be negative")
            checked[name] = amount
        else:
            if not isinstance(value, int) or isinstance(value, bool):
                raise InvalidValue(f"{name} must be an integer or null")
            if not 0 <= value <= _INT_LIMITS[name]:
                raise InvalidValue(f"{name} must be between 0 and {_INT_LIMITS[name]}")
            checked[name] = value
    return checked
