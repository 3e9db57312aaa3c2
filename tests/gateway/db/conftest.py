"""Fixtures of the database tests: every database test runs on SQLite and on PostgreSQL."""

from __future__ import annotations

import itertools
import secrets
from collections.abc import AsyncIterator, Callable, Iterator

import pytest

from gateway.db import AccountStore, upgrade
from tests.support.postgres_server import PostgresServer, postgres_server

BACKENDS = ("sqlite", "postgresql")


@pytest.fixture(scope="session")
def accounts_postgres() -> Iterator[PostgresServer]:
    """The PostgreSQL server, shared with every other fixture that uses one."""
    with postgres_server() as server:
        yield server


@pytest.fixture(scope="module", params=BACKENDS)
def new_database(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[[], str]]:
    """Makes fresh, empty databases on one backend; they are dropped after the module."""
    if request.param == "sqlite":
        folder = tmp_path_factory.mktemp("sqlite")
        numbers = itertools.count()
        yield lambda: f"sqlite:///{folder}/accounts-{next(numbers)}.db"
        return
    server: PostgresServer = request.getfixturevalue("accounts_postgres")
    made: list[str] = []

    def make() -> str:
        made.append(server.create_database())
        return made[-1]

    yield make
    for url in made:
        server.drop_database(url)


@pytest.fixture(scope="module")
def database_url(new_database: Callable[[], str]) -> str:
    """A fresh database for the test module: a SQLite file, or a PostgreSQL database."""
    return new_database()


@pytest.fixture(scope="module")
def migrated_url(database_url: str) -> str:
    """The module's database, migrated to the newest revision."""
    upgrade(database_url)
    return database_url


@pytest.fixture
async def store(migrated_url: str) -> AsyncIterator[AccountStore]:
    accounts = AccountStore.from_url(migrated_url)
    yield accounts
    await accounts.close()


@pytest.fixture(scope="session")
def secret() -> bytes:
    """The deployment secret keys are hashed under."""
    return secrets.token_bytes(32)
