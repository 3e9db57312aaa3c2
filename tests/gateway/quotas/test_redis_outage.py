"""The Redis store when Redis is down, hung or refuses us: a fast ``StoreUnavailable``."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio

from gateway.quotas import Demand, Limits, RedisQuotaStore, Scope, StoreUnavailable
from tests.support.redis_server import RedisServer, free_port, redis_server

P = "ten_1"
SCOPES = [Scope("tenant:ten_1", Limits(rpm=100, daily_tokens=10_000))]
#: What the contract promises a caller: an answer, or an error, within this.
DEADLINE_S = 0.5


def demand() -> Demand:
    return Demand(request_id=uuid.uuid4().hex, tokens=10)


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    """A server of these tests' own: they stop and freeze it."""
    with redis_server() as running:
        yield running


@pytest.fixture
async def store(server: RedisServer) -> AsyncIterator[RedisQuotaStore]:
    """A store with the default (production) timeouts on an empty server."""
    admin = redis.asyncio.Redis.from_url(server.url)
    try:
        await admin.flushall()
    finally:
        await admin.aclose()
    quota_store = RedisQuotaStore.from_url(server.url)
    yield quota_store
    await quota_store.close()
    server.resume()
    server.start()


async def timed_admit(store: RedisQuotaStore, server: RedisServer, ask: Demand) -> float:
    """Seconds until ``admit`` raised StoreUnavailable, whose message names no address."""
    began = time.perf_counter()
    with pytest.raises(StoreUnavailable) as raised:
        await store.admit(P, SCOPES, ask, 30)
    elapsed = time.perf_counter() - began
    assert str(server.port) not in str(raised.value)
    return elapsed


async def test_stopped_redis_fails_fast_and_keeps_data(
    store: RedisQuotaStore, server: RedisServer
) -> None:
    assert (await store.admit(P, SCOPES, demand(), 30)).admitted
    server.stop()
    for _ in range(3):
        elapsed = await timed_admit(store, server, demand())
        assert elapsed < DEADLINE_S
    with pytest.raises(StoreUnavailable):
        await store.ping()
    with pytest.raises(StoreUnavailable):
        await store.settle(P, "req_x", 0, 0)

    server.start()
    assert (await store.admit(P, SCOPES, demand(), 30)).admitted
    usage = await store.usage(P, "tenant:ten_1")
    # The first admission survived the restart (append-only file).
    assert (usage.requests_in_window, usage.daily_tokens) == (2, 20)


async def test_hung_redis_fails_fast_then_recovers(
    store: RedisQuotaStore, server: RedisServer
) -> None:
    assert (await store.admit(P, SCOPES, demand(), 30)).admitted
    server.pause()
    unknown = [demand() for _ in range(3)]
    for ask in unknown:
        elapsed = await timed_admit(store, server, ask)
        assert elapsed < DEADLINE_S
    server.resume()

    # The outcome of the timed-out admissions is unknown: release them, as callers must.
    for ask in unknown:
        await store.release(P, ask.request_id)
    assert (await store.admit(P, SCOPES, demand(), 30)).admitted
    usage = await store.usage(P, "tenant:ten_1")
    assert (usage.in_flight, usage.open_reservations) == (2, 2)
    for ask in unknown:
        refused = await store.admit(P, SCOPES, ask, 30)
        assert (refused.admitted, refused.dimension) == (False, None)


async def test_nothing_listening_fails_fast() -> None:
    port = free_port()
    store = RedisQuotaStore.from_url(f"redis://127.0.0.1:{port}/0")
    try:
        began = time.perf_counter()
        with pytest.raises(StoreUnavailable) as raised:
            await store.admit(P, SCOPES, demand(), 30)
        assert time.perf_counter() - began < DEADLINE_S
        assert str(port) not in str(raised.value)
    finally:
        await store.close()


async def test_errors_never_show_the_url_or_password(server: RedisServer) -> None:
    secret = "s3cret-" + uuid.uuid4().hex
    url = f"redis://:{secret}@127.0.0.1:{server.port}/0"
    admin = redis.asyncio.Redis.from_url(server.url)
    try:
        await admin.config_set("requirepass", "the-real-one")
    finally:
        await admin.aclose()
    store = RedisQuotaStore.from_url(url)
    try:
        with pytest.raises(StoreUnavailable) as wrong_password:
            await store.admit(P, SCOPES, demand(), 30)
        with pytest.raises(StoreUnavailable) as pinged:
            await store.ping()
        server.stop()
        with pytest.raises(StoreUnavailable) as stopped:
            await store.admit(P, SCOPES, demand(), 30)
    finally:
        await store.close()
        server.stop()  # a restart forgets the password: CONFIG SET is not persisted
        server.start()
    for error in (wrong_password.value, pinged.value, stopped.value):
        for leak in (secret, url, "the-real-one", str(server.port), "127.0.0.1"):
            assert leak not in str(error)


async def test_after_a_restart_stale_pooled_connections_fail_no_call(
    store: RedisQuotaStore, server: RedisServer
) -> None:
    # Fill the pool with connections, then restart the server under them.
    first = await asyncio.gather(*(store.admit(P, SCOPES, demand(), 30) for _ in range(20)))
    assert all(d.admitted for d in first)
    server.stop()
    server.start()
    await asyncio.sleep(1.2)  # past the pool's health-check interval: each is checked first
    again = await asyncio.gather(*(store.admit(P, SCOPES, demand(), 30) for _ in range(20)))
    assert all(d.admitted for d in again)
