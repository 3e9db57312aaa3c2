"""Database URLs as users write them, the engines made from them, and how they are logged.

Tollgate speaks to SQLite (the embedded default) and to PostgreSQL through psycopg 3. Users
write PostgreSQL URLs the way libpq documents them (``postgres://`` or ``postgresql://``,
with or without a password or a query); `normalize_url` turns every such form into the
``postgresql+psycopg://`` URL SQLAlchemy needs, and leaves SQLite URLs as they are.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.pool import StaticPool

__all__ = ["SQLITE_WRITE_OPTION", "is_sqlite", "make_engine", "normalize_url", "redact_url"]

_POSTGRES_SCHEMES = frozenset({"postgres", "postgresql"})
_PG_DRIVER = "postgresql+psycopg"
_SQLITE_BUSY_TIMEOUT_MS = 5000
_REDACTED = "***"
_QUERY_PASSWORD = re.compile(r"(?i)((?:^|[?&])password=)[^&#]*")

#: Execution option that makes a SQLite transaction take the write lock when it begins
#: (``BEGIN IMMEDIATE``), so that a read followed by a write waits for other writers instead
#: of failing. PostgreSQL ignores it.
SQLITE_WRITE_OPTION = "tollgate_sqlite_write"


class _Parts:
    """A URL split into scheme, user, password and the rest (host, path, query).

    The user info ends at the last "@" before the query, so a password may hold an "@" (and
    the query may hold one too: an application name, say). With ``greedy`` it ends at the
    last "@" of all, so that a password holding a "?" is covered too: what redaction wants.
    """

    def __init__(self, url: str, *, greedy: bool = False) -> None:
        scheme, sep, rest = url.partition("://")
        if not sep or not scheme:
            raise ValueError("a database URL starts with a scheme, like postgresql:// or sqlite://")
        self.scheme = scheme
        self.user: str | None = None
        self.password: str | None = None
        query_at = -1 if greedy else rest.find("?")
        at = rest.rfind("@", 0, query_at if query_at >= 0 else len(rest))
        if at >= 0:
            user_info, rest = rest[:at], rest[at + 1 :]
            user, colon, password = user_info.partition(":")
            self.user = user
            self.password = password if colon else None
        self.rest = rest

    def render(self, password: str | None, *, quoted: bool) -> str:
        def encode(text: str) -> str:
            return quote(unquote(text), safe="") if quoted else text

        if self.user is None:
            return f"{self.scheme}://{self.rest}"
        user_info = encode(self.user)
        if password is not None:
            user_info += ":" + encode(password)
        return f"{self.scheme}://{user_info}@{self.rest}"


def _is_postgres(scheme: str) -> bool:
    return scheme.lower().partition("+")[0] in _POSTGRES_SCHEMES


def is_sqlite(url: str) -> bool:
    """Whether ``url`` names a SQLite database."""
    scheme = url.strip().partition(":")[0]
    return scheme.lower().partition("+")[0] == "sqlite"


def normalize_url(url: str) -> str:
    """The SQLAlchemy URL for ``url``: PostgreSQL through psycopg 3, SQLite unchanged.

    Every PostgreSQL form (``postgres://``, ``postgresql://``, any ``postgresql+driver://``)
    becomes ``postgresql+psycopg://``, and its user and password are percent-encoded, so a
    password holding ``@``, ``/`` or ``:`` works whether or not it was encoded.

    Raises:
        ValueError: the URL names neither SQLite nor PostgreSQL.
    """
    url = url.strip()
    if is_sqlite(url):
        return url
    parts = _Parts(url)
    if not _is_postgres(parts.scheme):
        raise ValueError(
            f"unsupported database URL {redact_url(url)!r}: "
            "use sqlite:///path/to.db or postgresql://user:password@host:port/database"
        )
    parts.scheme = _PG_DRIVER
    return parts.render(parts.password, quoted=True)


def redact_url(url: str) -> str:
    """``url`` with its password (in the user info or the query) replaced by ``***``.

    Works for any ``scheme://`` URL (Redis ones too) and never raises. When in doubt it hides
    more: in a URL with an "@" in its query, whatever precedes that "@" may be hidden.
    """
    try:
        parts = _Parts(url.strip(), greedy=True)
    except ValueError:
        return _QUERY_PASSWORD.sub(rf"\1{_REDACTED}", url)
    password = None if parts.password is None else _REDACTED
    parts.rest = _QUERY_PASSWORD.sub(rf"\1{_REDACTED}", parts.rest)
    return parts.render(password, quoted=False)


def _sqlite_engine(url: str) -> Engine:
    database = make_url(url).database
    kwargs: dict[str, Any] = {}
    if not database or database == ":memory:":
        # One shared connection, or each thread would see its own empty database.
        kwargs["poolclass"] = StaticPool
    elif not database.startswith("file:"):
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"check_same_thread": False}, **kwargs)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Transactions are begun below, not by the driver, so that every statement (DDL and
        # reads included) runs in one; and the pragmas need no transaction open.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {_SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        write = connection.get_execution_options().get(SQLITE_WRITE_OPTION, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine


def make_engine(url: str, *, pool_size: int = 5, max_overflow: int = 10) -> Engine:
    """A SQLAlchemy engine for ``url`` (any form `normalize_url` takes).

    SQLite: the database file's folder is created, connections may cross threads, and each
    one runs in WAL mode with a 5 s busy timeout and foreign keys enforced; every transaction
    is begun explicitly (see `SQLITE_WRITE_OPTION`). PostgreSQL: a pool of ``pool_size``
    connections (plus ``max_overflow`` in bursts), each checked before use.
    """
    normalized = normalize_url(url)
    if is_sqlite(normalized):
        return _sqlite_engine(normalized)
    return create_engine(
        normalized,
        pool_pre_ping=True,
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_recycle=1800,
    )
