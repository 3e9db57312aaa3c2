"""A cache store that stops answering costs a request little and fails none."""

from __future__ import annotations

import time

import pytest

from gateway.cache import CacheUnavailable, RedisCacheStore, ResponseCache
from serving import SamplingOptions
from tests.conftest import free_port
from tests.support.redis_server import RedisServer


async def test_a_silent_store_is_a_quick_miss(cache_redis: RedisServer) -> None:
    cache_redis.start()
    cache_redis.resume()
    store = RedisCacheStore.from_url(cache_redis.url, 1 << 20, timeout_s=0.05)
    cache = ResponseCache(store)
    key = cache.key(
        tenant="t", model="m", model_digest="d", prompts=[[1, 2]], options=SamplingOptions(4)
    )
    try:
        await store.put(key, b"x", 60)
        cache_redis.pause()  # the server stops answering (SIGSTOP)
        started = time.monotonic()
        assert await cache.lookup(key) is None
        with pytest.raises(CacheUnavailable):
            await store.get(key)
        assert time.monotonic() - started < 1.0
    finally:
        cache_redis.resume()
        await cache.close()


async def test_a_store_that_is_not_there_raises_its_own_error() -> None:
    store = RedisCacheStore.from_url(f"redis://127.0.0.1:{free_port()}/0", 1024, timeout_s=0.05)
    try:
        with pytest.raises(CacheUnavailable) as raised:
            await store.put("k", b"v", 60)
        assert "127.0.0.1" not in str(raised.value)
    finally:
        await store.close()


def test_keys_differ_by_tenant_options_prompt_and_model_entry() -> None:
    cache = ResponseCache.__new__(ResponseCache)
    cache.shared_models = frozenset({"shared-model"})
    base = {
        "tenant": "a",
        "model": "m",
        "model_digest": "d1",
        "prompts": [[1, 2, 3]],
        "options": SamplingOptions(8, temperature=0),
    }
    variants = [
        {"tenant": "b"},
        {"model_digest": "d2"},
        {"prompts": [[1, 2, 4]]},
        {"prompts": [[1, 2, 3], [1, 2, 3]]},
        {"options": SamplingOptions(9, temperature=0)},
        {"options": SamplingOptions(8, temperature=0, stop=("x",))},
        {"options": SamplingOptions(8, temperature=0, logprobs=2)},
    ]
    key = cache.key(**base)  # type: ignore[arg-type]
    assert key == cache.key(**base)  # type: ignore[arg-type]
    for change in variants:
        assert cache.key(**{**base, **change}) != key, change  # type: ignore[arg-type]
    shared = {**base, "model": "shared-model"}
    assert cache.key(**shared) == cache.key(**{**shared, "tenant": "b"})  # type: ignore[arg-type]
