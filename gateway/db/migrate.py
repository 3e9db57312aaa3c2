"""Schema migrations, configured in code: no ``alembic.ini`` is needed to run them.

Several replicas may start at once and each upgrade the database: on PostgreSQL the upgrade
holds a session-level advisory lock, on SQLite an exclusive lock on a file next to the
database, so one upgrades while the others wait and then find nothing left to do.
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, text

from gateway.db.url import make_engine

__all__ = ["MIGRATIONS_DIR", "current", "head", "upgrade"]

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
#: The PostgreSQL advisory lock key migrations hold: the first 8 bytes of
#: sha256(b"tollgate:migrations"), as a signed integer.
ADVISORY_LOCK_KEY = 4727162594618471470


def _config(connection: Connection | None = None) -> Config:
    config = Config()
    # The option values go through configparser interpolation: a "%" must be doubled.
    config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    config.set_main_option("path_separator", "os")
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head() -> str:
    """The newest revision the migrations know."""
    revision = ScriptDirectory.from_config(_config()).get_current_head()
    if revision is None:
        raise RuntimeError(f"no migrations found in {MIGRATIONS_DIR}")
    return revision


@contextmanager
def _file_lock(database: str | None) -> Iterator[None]:
    if not database or database == ":memory:" or database.startswith("file:"):
        yield
        return
    path = Path(f"{database}.migrate-lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def _advisory_lock(connection: Connection) -> Iterator[None]:
    # A session-level lock, not a transaction-level one: it outlives the transactions the
    # migrations commit, and the server drops it if this process dies holding it.
    connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": ADVISORY_LOCK_KEY})
    connection.commit()
    try:
        yield
    finally:
        connection.rollback()
        connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": ADVISORY_LOCK_KEY})
        connection.commit()


def upgrade(url: str, revision: str = "head") -> None:
    """Migrates the database at ``url`` up to ``revision``; safe to run from many processes.

    Args:
        url: The database, in any form `normalize_url` takes.
        revision: The revision to reach; the newest by default.
    """
    engine = make_engine(url)
    try:
        sqlite = engine.dialect.name == "sqlite"
        with (
            _file_lock(engine.url.database) if sqlite else nullcontext(),
            engine.connect() as connection,
            nullcontext() if sqlite else _advisory_lock(connection),
        ):
            command.upgrade(_config(connection), revision)
            connection.commit()
    finally:
        engine.dispose()


def current(url: str) -> str | None:
    """The revision the database at ``url`` is at; ``None`` when it was never migrated."""
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()
