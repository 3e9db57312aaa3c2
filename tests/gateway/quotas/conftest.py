"""The quota store fixtures: every test taking ``store`` runs on each backend."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest

from gateway.quotas import MemoryQuotaStore, QuotaStore, RedisQuotaStore
from tests.support.redis_server import RedisServer
from tests.support.redis_server import redis_server as start_redis

#: Short enough that the tests can watch a window go by.
WINDOW_S = 2

StoreFactory = Callable[[int], Awaitable[QuotaStore]]


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A Redis of the quota tests' own, which they flush at will."""
    with start_redis() as server:
        yield server


@pytest.fixture(params=["memory", "redis"])
async def store_factory(request: pytest.FixtureRequest) -> AsyncIterator[StoreFactory]:
    """Builds empty stores of one backend with a given window; closes them afterwards."""
    built: list[QuotaStore] = []
    url = ""
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        url = server.fresh()

    async def make(window_s: int) -> QuotaStore:
        store: QuotaStore
        if url:
            # A generous timeout: a loaded test machine must not turn into an outage.
            store = RedisQuotaStore.from_url(url, timeout_s=2.0, window_s=window_s)
        else:
            store = MemoryQuotaStore(window_s=window_s)
        built.append(store)
        return store

    yield make
    for store in built:
        await store.close()


@pytest.fixture
async def store(store_factory: StoreFactory) -> QuotaStore:
    """An empty store with a ``WINDOW_S`` window."""
    return await store_factory(WINDOW_S)
