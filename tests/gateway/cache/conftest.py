"""The cache store fixtures: every test taking ``make_store`` runs on each backend."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator

import pytest

from gateway.cache import CacheStore, MemoryCacheStore, RedisCacheStore
from tests.support.redis_server import RedisServer
from tests.support.redis_server import redis_server as start_redis

StoreFactory = Callable[[int], CacheStore]


@pytest.fixture(scope="session")
def cache_redis() -> Iterator[RedisServer]:
    """A Redis of the cache tests' own, which they flush at will."""
    with start_redis() as server:
        yield server


@pytest.fixture(params=["memory", "redis"])
async def make_store(request: pytest.FixtureRequest) -> AsyncIterator[StoreFactory]:
    """Builds empty stores of one backend with a given bound; closes them afterwards."""
    built: list[CacheStore] = []
    url = ""
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("cache_redis")
        url = server.fresh()

    def make(max_bytes: int) -> CacheStore:
        store: CacheStore
        if url:
            # A generous timeout: a loaded test machine must not turn into an outage.
            store = RedisCacheStore.from_url(url, max_bytes, timeout_s=2.0)
        else:
            store = MemoryCacheStore(max_bytes)
        built.append(store)
        return store

    yield make
    for store in built:
        await store.close()
