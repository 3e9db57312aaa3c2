"""Key lookups when the accounts database fails, hangs or is flooded with made-up keys.

Every failure here is real: a SQLite file that is gone, a PostgreSQL database dropped, a
table locked by another connection. Queries are counted with an engine event listener,
which observes and changes nothing.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import psycopg
import pytest
from litestar.testing import AsyncTestClient
from sqlalchemy import Engine, event
from sqlalchemy.engine import make_url

from gateway.app import create_app
from gateway.auth import Authenticator
from gateway.credentials import make_admin_token
from gateway.db import AccountStore, upgrade
from gateway.errors import ServiceUnavailable, Unauthenticated
from gateway.keys import generate_key
from gateway.settings import Settings
from serving import EngineHost
from serving.catalog import Catalog
from tests.support.postgres_server import PostgresServer

SECRET_TEXT = secrets.token_hex(32)
SECRET = SECRET_TEXT.encode()
ADMIN_TOKEN = make_admin_token()


class Clock:
    """The clock cache entries age by; it moves only when told to."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Queries:
    """Counts the key lookup queries an engine starts and finishes, and the errors it meets.

    Through the engine's events: they observe, they change nothing.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._lock = threading.Lock()
        self.started = 0
        self.finished = 0
        self.errors = 0
        event.listen(engine, "before_cursor_execute", self._before)
        event.listen(engine, "after_cursor_execute", self._after)
        event.listen(engine, "handle_error", self._error)

    def _before(self, *args: Any) -> None:
        if _is_lookup(args[2]):
            with self._lock:
                self.started += 1

    def _after(self, *args: Any) -> None:
        if _is_lookup(args[2]):
            with self._lock:
                self.finished += 1

    def _error(self, *args: Any) -> None:
        with self._lock:
            self.errors += 1

    async def settle(self, quiet_s: float = 0.3, timeout_s: float = 15.0) -> None:
        """Waits until no query has been in flight or started for ``quiet_s``."""
        deadline = time.monotonic() + timeout_s
        seen, quiet_since = -1, time.monotonic()
        while time.monotonic() < deadline:
            state = (self.started, self.finished)
            if state[0] != state[1] or state[0] != seen:
                seen, quiet_since = state[0], time.monotonic()
            elif time.monotonic() - quiet_since >= quiet_s:
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"queries still running: {self.started} started, {self.finished} done")

    def close(self) -> None:
        event.remove(self._engine, "before_cursor_execute", self._before)
        event.remove(self._engine, "after_cursor_execute", self._after)
        event.remove(self._engine, "handle_error", self._error)


def _is_lookup(statement: str) -> bool:
    # What a key lookup reads: the key with its tenant, then the quota policies.
    text = statement.lower()
    return text.lstrip().startswith("select") and ("api_key" in text or "quota_policy" in text)


@dataclass
class Database:
    """A migrated accounts database, and a way to make it fail for real."""

    backend: str
    url: str
    server: PostgresServer | None

    async def fail(self, store: AccountStore) -> None:
        """The database goes away under ``store``."""
        if self.server is not None:
            # Drops it with its connections: reconnecting finds no database.
            await asyncio.to_thread(self.server.drop_database, self.url)
            return
        await asyncio.to_thread(_remove_sqlite_file, Path(str(make_url(self.url).database)))
        await store.close()  # the pooled connections go, as when the pool recycles them

    def forbidden(self) -> list[str]:
        """Text that must never reach a client: the URL's parts, driver and SQL words."""
        url = make_url(self.url)
        words = [
            self.url,
            "://",
            str(url.database),
            "sqlite",
            "psycopg",
            "postgres",
            "sqlalchemy",
            "sqlalche.me",
            "OperationalError",
            "SELECT",
            "api_key",
            "unable to open",
            "does not exist",
            "connection",
        ]
        if url.host:
            words += [url.host, f":{url.port}"]
        return words


def _remove_sqlite_file(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    path.mkdir()  # a folder where the file was: SQLite cannot open it


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'accounts.db'}"
        upgrade(url)
        yield Database("sqlite", url, None)
        return
    server: PostgresServer = request.getfixturevalue("postgres")
    with server.database() as url:
        upgrade(url)
        yield Database("postgresql", url, server)


@pytest.fixture
def postgres_database(postgres: PostgresServer) -> Iterator[Database]:
    with postgres.database() as url:
        upgrade(url)
        yield Database("postgresql", url, postgres)


@pytest.fixture
async def store(database: Database) -> AsyncIterator[AccountStore]:
    accounts = AccountStore.from_url(database.url)
    yield accounts
    await accounts.close()


@pytest.fixture
async def postgres_store(postgres_database: Database) -> AsyncIterator[AccountStore]:
    accounts = AccountStore.from_url(postgres_database.url)
    yield accounts
    await accounts.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


def make_authenticator(store: AccountStore, clock: Clock, **options: Any) -> Authenticator:
    return Authenticator(store, secret=SECRET, admin_token=ADMIN_TOKEN, clock=clock, **options)


def bearer(key: str) -> str:
    return f"Bearer {key}"


async def new_key(store: AccountStore, name: str = "app") -> tuple[str, str]:
    """A new tenant and key: (the key's id, the key)."""
    tenant = await store.create_tenant(name)
    row, key = await store.create_key(tenant.id, name=name, secret=SECRET)
    return row.id, key


async def unavailable(authenticator: Authenticator, key: str) -> ServiceUnavailable:
    with pytest.raises(ServiceUnavailable) as caught:
        await authenticator.authenticate(bearer(key))
    return caught.value


def assert_clean_503(error: ServiceUnavailable, database: Database) -> None:
    assert error.status_code == 503
    assert error.code == "accounts_unavailable"
    assert error.headers is not None
    assert int(error.headers["retry-after"]) >= 1
    body = msgspec.json.encode(error.body()).decode()
    assert set(msgspec.json.decode(body)["error"]) == {"message", "type", "param", "code"}
    for word in database.forbidden():
        assert word.lower() not in body.lower(), f"{word!r} in {body}"


@contextmanager
def locked_table(database: Database) -> Iterator[None]:
    """Another connection holds ``api_key`` locked: every lookup waits until the block ends."""
    with psycopg.connect(database.url, connect_timeout=5) as connection:
        connection.execute("LOCK TABLE api_key IN ACCESS EXCLUSIVE MODE")
        try:
            yield
        finally:
            connection.rollback()


# The database fails


async def test_a_known_key_works_from_the_cache_for_key_stale_s_then_gets_503(
    database: Database, store: AccountStore, clock: Clock
) -> None:
    _, key = await new_key(store)
    authenticator = make_authenticator(store, clock, cache_s=1.0, stale_s=60.0)
    known = await authenticator.authenticate(bearer(key))
    await database.fail(store)
    clock.advance(1.5)  # past key_cache_s: the cache entry is stale, the database is asked
    assert await authenticator.authenticate(bearer(key)) == known
    clock.advance(58.0)  # 59.5 s after the lookup; asked again, and failing again
    assert await authenticator.authenticate(bearer(key)) == known
    clock.advance(1.0)  # 60.5 s: past key_stale_s
    assert_clean_503(await unavailable(authenticator, key), database)


async def test_while_the_database_fails_a_known_key_asks_it_once_per_key_cache_s(
    database: Database, store: AccountStore, clock: Clock
) -> None:
    _, key = await new_key(store)
    authenticator = make_authenticator(store, clock, cache_s=1.0)
    known = await authenticator.authenticate(bearer(key))
    queries = Queries(store.engine)
    try:
        await database.fail(store)
        clock.advance(1.5)
        assert await authenticator.authenticate(bearer(key)) == known
        failed = queries.errors
        assert failed >= 1
        for _ in range(20):
            assert await authenticator.authenticate(bearer(key)) == known
        assert queries.errors == failed  # served from the cache without asking again
        clock.advance(1.1)
        assert await authenticator.authenticate(bearer(key)) == known
        assert queries.errors > failed  # asked once more, and still failing
    finally:
        queries.close()


async def test_an_unknown_key_gets_503_not_401_while_the_database_is_down(
    database: Database,
    store: AccountStore,
    clock: Clock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _, never_used = await new_key(store)  # real, but this replica never looked it up
    authenticator = make_authenticator(store, clock)
    await database.fail(store)
    with caplog.at_level("INFO", logger="gateway.auth"):
        for key in (generate_key(), never_used):
            assert_clean_503(await unavailable(authenticator, key), database)
    assert any(record.levelname == "WARNING" for record in caplog.records)
    logged = "\n".join(record.getMessage() for record in caplog.records).lower()
    for word in database.forbidden():
        if word != "OperationalError":  # the class name is logged, never its text
            assert word.lower() not in logged, f"{word!r} logged: {logged}"
    # What needs no database still answers as before.
    with pytest.raises(Unauthenticated):
        await authenticator.authenticate(bearer("tg_" + "x" * 36))
    operator = await authenticator.authenticate(bearer(ADMIN_TOKEN))
    assert operator.operator


async def test_a_revoked_key_stops_within_key_cache_s_while_the_database_answers(
    store: AccountStore, clock: Clock
) -> None:
    authenticator = make_authenticator(store, clock, cache_s=1.0, stale_s=300.0)
    first_id, first = await new_key(store, "first")
    second_id, second = await new_key(store, "second")
    for key in (first, second):
        await authenticator.authenticate(bearer(key))
    await store.revoke_key(first_id)
    clock.advance(0.5)
    await authenticator.authenticate(bearer(first))  # cached, as promised
    clock.advance(0.6)
    with pytest.raises(Unauthenticated):  # a stale entry exists, but the database answers
        await authenticator.authenticate(bearer(first))
    await store.revoke_key(second_id)
    authenticator.forget()  # this replica revoked it: no wait at all
    with pytest.raises(Unauthenticated):
        await authenticator.authenticate(bearer(second))


# The database is slow


async def test_a_locked_table_answers_in_time_and_late_answers_fill_the_cache(
    postgres_database: Database, postgres_store: AccountStore, clock: Clock
) -> None:
    store = postgres_store
    key_id, key = await new_key(store)
    authenticator = make_authenticator(store, clock, lookup_timeout_s=0.3)
    known = await authenticator.authenticate(bearer(key))
    assert known.key_limits.rpm is None
    tenant_id = known.tenant_id
    assert tenant_id is not None
    await store.set_quota(tenant_id, key_id, rpm=7)  # the cache has not seen this yet
    made_up = generate_key()
    queries = Queries(store.engine)
    clock.advance(1.5)  # past key_cache_s
    try:
        with locked_table(postgres_database):
            began = time.monotonic()
            answers = await asyncio.gather(
                *(authenticator.authenticate(bearer(k)) for k in (key, key, made_up, made_up)),
                return_exceptions=True,
            )
            took = time.monotonic() - began
            assert answers[:2] == [known, known]  # the stale entry, once the lookup timed out
            for answer in answers[2:]:
                assert isinstance(answer, ServiceUnavailable), answer
                assert_clean_503(answer, postgres_database)
            assert 0.3 <= took < 1.5, took
            assert queries.started == 2  # one lookup per key, shared by both requests
            # The lookups are still stuck: later requests answer at once and ask nothing new.
            began = time.monotonic()
            assert await authenticator.authenticate(bearer(key)) == known
            await unavailable(authenticator, made_up)
            assert time.monotonic() - began < 0.2
            assert queries.started == 2
        await queries.settle()
        asked = queries.started
        # The lookups finished after every request had stopped waiting, and filled the cache.
        refreshed = await authenticator.authenticate(bearer(key))
        assert refreshed.key_limits.rpm == 7
        with pytest.raises(Unauthenticated):
            await authenticator.authenticate(bearer(made_up))
        assert queries.started == asked
    finally:
        queries.close()


async def test_a_flood_of_distinct_made_up_keys_holds_half_the_lookup_slots(
    postgres_database: Database, postgres_store: AccountStore, clock: Clock
) -> None:
    store = postgres_store
    _, key = await new_key(store)
    authenticator = make_authenticator(store, clock, lookup_timeout_s=0.5, max_lookups=4)
    known = await authenticator.authenticate(bearer(key))
    queries = Queries(store.engine)
    clock.advance(1.5)  # past key_cache_s: the known key needs a lookup too
    try:
        with locked_table(postgres_database):
            began = time.monotonic()
            flood = [
                asyncio.ensure_future(authenticator.authenticate(bearer(generate_key())))
                for _ in range(40)
            ]
            await asyncio.sleep(0.15)
            assert queries.started == 2  # made-up keys reach the database two at a time
            assert await authenticator.authenticate(bearer(key)) == known
            assert queries.started == 3  # the known key's refresh found a slot of its own
            answers = await asyncio.gather(*flood, return_exceptions=True)
            took = time.monotonic() - began
            assert all(isinstance(a, ServiceUnavailable) for a in answers), answers
            assert took < 1.5, took  # each waited at most the lookup timeout
        await queries.settle()
        # Once the lock went, only the lookups that had a slot ran (the known key's second
        # query is its quota policies); the queued ones had given up.
        assert queries.started == 4
        with pytest.raises(Unauthenticated):
            await authenticator.authenticate(bearer(generate_key()))
    finally:
        queries.close()


# Made-up keys


async def test_the_same_made_up_key_a_thousand_times_costs_one_query(
    store: AccountStore, clock: Clock
) -> None:
    authenticator = make_authenticator(store, clock, unknown_cache_s=5.0)
    queries = Queries(store.engine)
    made_up = generate_key()
    try:
        answers = await asyncio.gather(
            *(authenticator.authenticate(bearer(made_up)) for _ in range(500)),
            return_exceptions=True,
        )
        assert all(isinstance(a, Unauthenticated) for a in answers)
        for _ in range(500):
            with pytest.raises(Unauthenticated):
                await authenticator.authenticate(bearer(made_up))
        assert queries.started == 1
        clock.advance(5.1)  # past key_unknown_cache_s: asked once more
        with pytest.raises(Unauthenticated):
            await authenticator.authenticate(bearer(made_up))
        assert queries.started == 2
    finally:
        queries.close()


# Through the HTTP app


async def test_the_app_answers_503_in_the_openai_shape_when_the_database_is_down(
    postgres_database: Database, tmp_path: Path
) -> None:
    server = postgres_database.server
    assert server is not None
    seeding = AccountStore.from_url(postgres_database.url)
    _, used = await new_key(seeding, "used")
    _, unused = await new_key(seeding, "unused")
    await seeding.close()
    settings = Settings(
        data_dir=str(tmp_path),
        log_level="WARNING",
        database_url=postgres_database.url,
        admin_token=ADMIN_TOKEN,
        secret=SECRET_TEXT,
        key_cache_s=0.05,
        key_lookup_timeout_ms=1000,
    )
    app = create_app(settings, host=EngineHost(Catalog([])))
    async with AsyncTestClient(app) as client:
        response = await client.get("/v1/models", headers={"authorization": bearer(used)})
        assert response.status_code == 200, response.text
        await asyncio.to_thread(server.drop_database, postgres_database.url)
        await asyncio.sleep(0.1)  # past key_cache_s
        response = await client.get("/v1/models", headers={"authorization": bearer(used)})
        assert response.status_code == 200, response.text  # within key_stale_s
        for key in (unused, generate_key()):
            response = await client.get("/v1/models", headers={"authorization": bearer(key)})
            assert response.status_code == 503, response.text
            assert int(response.headers["retry-after"]) >= 1
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert error["code"] == "accounts_unavailable"
            assert error["type"] == "server_error"
            for word in postgres_database.forbidden():
                assert word.lower() not in response.text.lower(), f"{word!r} in {response.text}"
