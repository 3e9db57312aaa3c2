"""The accounts tables: tenants, their API keys, and the quota policies on either.

Nothing is ever deleted: a deleted tenant keeps its row (``deleted_at``) and a revoked key
keeps its (``revoked_at``), so that usage and invoices can always name them. Every timestamp
is a timezone-aware UTC datetime. The migrations in ``gateway/db/migrations`` create exactly
these tables; a test compares the two.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    Index,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlmodel import Field, SQLModel

from billing.sqltypes import NAMING_CONVENTION
from gateway.db.types import Money, UTCDateTime, utcnow
from gateway.keys import random_base62

__all__ = [
    "NAME_MAX_LENGTH",
    "QUOTA_LIMITS",
    "ROLES",
    "ApiKey",
    "CatalogSeed",
    "DeployedModel",
    "QuotaPolicy",
    "ServingPolicyRow",
    "Tenant",
    "metadata",
    "new_key_id",
    "new_tenant_id",
]

#: The roles a key can have: ``admin`` keys may also call the admin API.
ROLES = ("user", "admin")
#: The limits a quota policy holds, in the order the admin API lists them.
QUOTA_LIMITS = (
    "rpm",
    "tpm",
    "max_concurrency",
    "daily_tokens",
    "monthly_tokens",
    "monthly_spend_usd",
)
NAME_MAX_LENGTH = 200
_ID_LENGTH = 32
_RANDOM_ID_CHARS = 16

#: The tables the migrations manage, with the names constraints and indexes are given.
metadata = MetaData(naming_convention=NAMING_CONVENTION)


def new_tenant_id() -> str:
    """``ten_`` + 16 random base62 characters."""
    return "ten_" + random_base62(_RANDOM_ID_CHARS)


def new_key_id() -> str:
    """``key_`` + 16 random base62 characters (an id, not the key itself)."""
    return "key_" + random_base62(_RANDOM_ID_CHARS)


class _Table(SQLModel):
    metadata: ClassVar[MetaData] = metadata


class Tenant(_Table, table=True):
    """A customer: the unit that owns keys, quotas and usage."""

    __tablename__ = "tenant"

    id: str = Field(default_factory=new_tenant_id, primary_key=True, sa_type=String(_ID_LENGTH))
    name: str = Field(sa_type=String(NAME_MAX_LENGTH))
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    #: Set when the tenant was deleted; its rows stay for billing.
    deleted_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class ApiKey(_Table, table=True):
    """An API key of a tenant. Only its HMAC digest and a hint are stored, never the key."""

    __tablename__ = "api_key"
    __table_args__ = (
        CheckConstraint("role IN ('user', 'admin')", name="role"),
        Index("ix_api_key_tenant_id", "tenant_id"),
        Index("ix_api_key_digest", "digest", unique=True),
    )

    id: str = Field(default_factory=new_key_id, primary_key=True, sa_type=String(_ID_LENGTH))
    tenant_id: str = Field(foreign_key="tenant.id", sa_type=String(_ID_LENGTH))
    name: str = Field(sa_type=String(NAME_MAX_LENGTH))
    role: str = Field(default="user", sa_type=String(16))
    #: HMAC-SHA256 of the key under the deployment's secret, hex.
    digest: str = Field(sa_type=String(64))
    #: ``tg_`` + the key's first 4 random characters.
    prefix: str = Field(sa_type=String(16))
    #: The key's last 4 characters.
    last4: str = Field(sa_type=String(4))
    #: Models the key may use; ``None`` means every model.
    models: list[str] | None = Field(default=None, sa_type=JSON(none_as_null=True))
    expires_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    revoked_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class QuotaPolicy(_Table, table=True):
    """The limits of a tenant (``key_id`` is ``None``) or of one of its keys.

    Every limit is optional; ``None`` means unlimited. A request must stay within both its
    tenant's policy and its key's.
    """

    __tablename__ = "quota_policy"
    __table_args__ = (
        # Its index also serves lookups by tenant alone (the leading column).
        UniqueConstraint("tenant_id", "key_id"),
        # NULLs are distinct in unique constraints, so the one tenant-level policy per
        # tenant needs a partial index of its own.
        Index(
            "uq_quota_policy_tenant_level",
            "tenant_id",
            unique=True,
            sqlite_where=text("key_id IS NULL"),
            postgresql_where=text("key_id IS NULL"),
        ),
    )

    id: int | None = Field(default=None, primary_key=True)
    tenant_id: str = Field(foreign_key="tenant.id", sa_type=String(_ID_LENGTH))
    key_id: str | None = Field(default=None, foreign_key="api_key.id", sa_type=String(_ID_LENGTH))
    #: Requests per minute.
    rpm: int | None = None
    #: Tokens (prompt and completion) per minute.
    tpm: int | None = Field(default=None, sa_type=BigInteger)
    #: Requests in flight at once.
    max_concurrency: int | None = None
    #: Tokens per UTC day.
    daily_tokens: int | None = Field(default=None, sa_type=BigInteger)
    #: Tokens per UTC calendar month.
    monthly_tokens: int | None = Field(default=None, sa_type=BigInteger)
    #: Spend per UTC calendar month, in USD.
    monthly_spend_usd: Decimal | None = Field(default=None, sa_type=Money)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class ServingPolicyRow(_Table, table=True):
    """The operator's serving policy (cache, queues, shares): one JSON document, versioned, so
    that every replica applies the same one (``GET/PATCH /admin/v1/serving``)."""

    __tablename__ = "serving_policy"

    id: int = Field(default=1, primary_key=True)
    #: Raised by one on every change; replicas reload when it moves.
    version: int = Field(sa_type=BigInteger)
    document: str = Field(sa_type=Text)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class DeployedModel(_Table, table=True):
    """One model of a deployment's catalog (``PUT /admin/v1/models/{name}``), as written in
    a models file; every replica of the deployment serves the same ones."""

    __tablename__ = "deployed_models"

    #: The deployment (``TOLLGATE_DEPLOYMENT``): replicas sharing it share the catalog.
    deployment: str = Field(primary_key=True, max_length=100)
    name: str = Field(primary_key=True, max_length=128)
    #: Raised by one on every change; replicas apply the entry again when it moves.
    version: int = Field(sa_type=BigInteger)
    #: The catalog entry (`serving.catalog.ModelSpec`) as JSON.
    spec: str = Field(sa_type=Text)
    #: ``file`` (the models file put it there) or ``api`` (the admin API did, last).
    origin: str = Field(max_length=8)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class CatalogSeed(_Table, table=True):
    """Which models file last seeded a deployment's catalog (its digest)."""

    __tablename__ = "catalog_seeds"

    deployment: str = Field(primary_key=True, max_length=100)
    digest: str = Field(max_length=64)
    seeded_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
