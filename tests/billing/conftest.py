"""Fixtures of the ledger, outbox and flusher tests.

Every test taking ``engine`` (or ``ledger``) runs on SQLite and on PostgreSQL; each backend
has one database migrated once per session, emptied of billing rows before every test. Redis
tests use a throwaway ``redis-server`` of their own, flushed before every test.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
import redis
import redis.asyncio
from sqlalchemy import Engine, delete

from billing.events import CacheTier, EventStatus, UsageEvent
from billing.ledger import Ledger
from billing.pricing import Price, rate
from billing.tables import metadata
from gateway.db import make_engine, upgrade
from tests.support.postgres_server import PostgresServer, postgres_server
from tests.support.redis_server import RedisServer
from tests.support.redis_server import redis_server as start_redis

BACKENDS = ("sqlite", "postgresql")
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="session")
def billing_postgres() -> Iterator[PostgresServer]:
    """The PostgreSQL server, shared with every other fixture that uses one."""
    with postgres_server() as server:
        yield server


@pytest.fixture(scope="session")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A SQLite file migrated to the newest revision."""
    url = f"sqlite:///{tmp_path_factory.mktemp('billing')}/billing.db"
    upgrade(url)
    return url


@pytest.fixture(scope="session")
def postgresql_url(billing_postgres: PostgresServer) -> Iterator[str]:
    """A PostgreSQL database migrated to the newest revision."""
    with billing_postgres.database() as url:
        upgrade(url)
        yield url


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest) -> str:
    """A migrated database of each backend in turn (rows of earlier tests possibly left)."""
    return str(request.getfixturevalue(f"{request.param}_url"))


def empty(engine: Engine) -> None:
    """Deletes every billing row."""
    with engine.begin() as connection:
        for table in metadata.sorted_tables:
            connection.execute(delete(table))


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    """An engine on an empty migrated database, of each backend in turn."""
    made = make_engine(database_url)
    empty(made)
    yield made
    made.dispose()


@pytest.fixture
def ledger(engine: Engine) -> Ledger:
    return Ledger(engine)


@pytest.fixture(scope="session")
def billing_redis() -> Iterator[RedisServer]:
    """A Redis of the billing tests' own, which they flush at will."""
    with start_redis() as server:
        yield server


@pytest.fixture
def redis_url(billing_redis: RedisServer) -> str:
    """The billing Redis, running and empty."""
    billing_redis.resume()
    billing_redis.start()
    with redis.Redis.from_url(billing_redis.url) as client:
        client.flushall()
    return billing_redis.url


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
    yield client
    await client.aclose()


@dataclass
class Events:
    """Makes usage events with unique ids, rated with a given price version."""

    numbers: Iterator[int] = field(default_factory=itertools.count)

    def make(
        self,
        *,
        price: Price | None = None,
        tenant_id: str = "ten_a",
        key_id: str | None = "key_a",
        model: str = "demo-chat",
        usage: tuple[int, int, int] = (100, 40, 20),
        when: datetime = T0,
        event_id: str | None = None,
        status: EventStatus = EventStatus.OK,
        tier: CacheTier | None = None,
    ) -> UsageEvent:
        prompt, cached, completion = usage
        number = next(self.numbers)
        if tier is None:
            tier = CacheTier.PREFIX if cached else CacheTier.NONE
        return UsageEvent(
            id=event_id or f"req_{number:08d}",
            occurred_at=when,
            tenant_id=tenant_id,
            key_id=key_id,
            model=model,
            operation="chat",
            prompt_tokens=prompt,
            cached_tokens=cached,
            completion_tokens=completion,
            cache_tier=tier,
            status=status,
            latency_ms=12.5,
            ttft_ms=3.25,
            gpu_ms=None,
            cost_usd=rate(price, prompt, cached, completion, tier),
            price_id=None if price is None else price.id,
        )

    def many(self, n: int, *, price: Price | None = None, start: datetime = T0) -> list[UsageEvent]:
        """``n`` events over three tenants, two keys (and none), two days."""
        made = []
        for i in range(n):
            made.append(
                self.make(
                    price=price,
                    tenant_id=f"ten_{i % 3}",
                    key_id=None if i % 5 == 0 else f"key_{i % 2}",
                    usage=(i % 97 + 1, min(i % 13, i % 97 + 1), i % 31),
                    when=start + timedelta(hours=i % 48, microseconds=i),
                )
            )
        return made


@pytest.fixture
def events() -> Events:
    return Events()


@pytest.fixture
async def demo_price(ledger: Ledger) -> Price:
    """A price of demo-chat with six places everywhere, from well before ``T0``."""
    return await ledger.set_price(
        "demo-chat",
        Decimal("0.150001"),
        Decimal("0.075003"),
        Decimal("0.600007"),
        T0 - timedelta(days=30),
    )


def sqlite_path(url: str) -> Path:
    return Path(url.removeprefix("sqlite:///"))
