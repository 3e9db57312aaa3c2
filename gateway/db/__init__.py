"""Tollgate's SQL database: tenants, API keys and quota policies, and their migrations.

SQLite (the embedded default) and PostgreSQL (through psycopg 3) behave the same here.
"""

from gateway.db.accounts import AccountStore
from gateway.db.errors import AccountError, Conflict, InvalidValue, NotFound
from gateway.db.migrate import current, upgrade
from gateway.db.tables import ApiKey, QuotaPolicy, Tenant, metadata
from gateway.db.url import make_engine, normalize_url, redact_url

__all__ = [
    "AccountError",
    "AccountStore",
    "ApiKey",
    "Conflict",
    "InvalidValue",
    "NotFound",
    "QuotaPolicy",
    "Tenant",
    "current",
    "make_engine",
    "metadata",
    "normalize_url",
    "redact_url",
    "upgrade",
]
