"""What every cache store does, on each backend: bounds, expiry, least recently used first."""

from __future__ import annotations

import asyncio
import os

from tests.gateway.cache.conftest import StoreFactory


async def test_a_value_comes_back_until_it_expires(make_store: StoreFactory) -> None:
    store = make_store(1 << 20)
    assert await store.get("k") is None
    await store.put("k", b"\x00value\xff", ttl_s=0.3)
    assert await store.get("k") == b"\x00value\xff"
    await asyncio.sleep(0.45)
    assert await store.get("k") is None


async def test_putting_again_replaces_and_counts_once(make_store: StoreFactory) -> None:
    store = make_store(1 << 20)
    await store.put("k", b"a" * 100, ttl_s=60)
    await store.put("k", b"b" * 40, ttl_s=60)
    assert await store.get("k") == b"b" * 40
    assert await store.size() == (1, 40)


async def test_the_bound_evicts_the_least_recently_used(make_store: StoreFactory) -> None:
    store = make_store(300)
    for name in ("a", "b", "c"):
        await store.put(name, name.encode() * 100, ttl_s=60)
        await asyncio.sleep(0.002)  # distinct use times (Redis counts milliseconds)
    assert await store.get("a") == b"a" * 100  # now the most recently used
    await asyncio.sleep(0.002)
    await store.put("d", b"d" * 100, ttl_s=60)
    assert await store.get("b") is None
    assert [await store.get(n) is not None for n in ("a", "c", "d")] == [True, True, True]
    entries, held = await store.size()
    assert (entries, held) == (3, 300)


async def test_a_value_over_the_bound_is_not_stored(make_store: StoreFactory) -> None:
    store = make_store(100)
    await store.put("small", b"s" * 60, ttl_s=60)
    await store.put("huge", b"h" * 101, ttl_s=60)
    assert await store.get("huge") is None
    assert await store.get("small") == b"s" * 60


async def test_many_writers_keep_the_bound(make_store: StoreFactory) -> None:
    store = make_store(10_000)
    values = {f"k{i}": os.urandom(50 + i % 200) for i in range(300)}
    await asyncio.gather(*(store.put(k, v, ttl_s=60) for k, v in values.items()))
    entries, held = await store.size()
    assert held <= 10_000
    found = {k: await store.get(k) for k in values}
    assert sum(len(v) for v in found.values() if v is not None) == held
    assert all(v is None or v == values[k] for k, v in found.items())
    assert sum(v is not None for v in found.values()) == entries


async def test_clear_forgets_everything(make_store: StoreFactory) -> None:
    store = make_store(1 << 20)
    await store.put("a", b"1", ttl_s=60)
    await store.clear()
    assert await store.get("a") is None
    assert await store.size() == (0, 0)
