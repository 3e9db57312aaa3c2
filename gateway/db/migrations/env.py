"""Alembic's entry point for Tollgate's migrations.

`gateway.db.migrate` runs it with a connection it already holds (and has locked), passed as
``config.attributes["connection"]``. Run by the ``alembic`` command instead, it connects to
the ``sqlalchemy.url`` option, in any form `gateway.db.normalize_url` takes.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from billing.tables import metadata as billing_metadata
from gateway.db.tables import metadata as accounts_metadata
from gateway.db.url import make_engine, normalize_url

#: Every table the migrations manage: the accounts tables and billing's.
metadata = [accounts_metadata, billing_metadata]

config = context.config


def _configure(connection: Connection) -> None:
    sqlite = connection.dialect.name == "sqlite"
    context.configure(
        connection=connection,
        target_metadata=metadata,
        compare_type=True,
        # SQLite cannot alter tables in place; batch mode copies them instead.
        render_as_batch=sqlite,
        # The engine begins every SQLite transaction itself, so its DDL is transactional too.
        transactional_ddl=True,
    )


def _run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = make_engine(config.get_main_option("sqlalchemy.url") or "")
    try:
        with engine.connect() as connection:
            _configure(connection)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


def _run_offline() -> None:
    context.configure(
        url=normalize_url(config.get_main_option("sqlalchemy.url") or ""),
        target_metadata=metadata,
        literal_binds=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    _run_offline()
else:
    _run_online()
