"""Where cached answers live: a bounded map of opaque keys to bytes, each with a lifetime.

A `CacheStore` holds entries of at most ``max_bytes`` in all; putting one that does not fit
evicts the least recently used first, and an entry older than its ``ttl_s`` is never
returned. `MemoryCacheStore` serves one process; `RedisCacheStore` is shared by every
gateway replica. Both pass one conformance suite (``tests/gateway/cache``).

A store that fails raises `CacheUnavailable`; callers treat it as a miss and never fail a
request for it.
"""

from __future__ import annotations

import abc
import asyncio
import time
from collections import OrderedDict

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

__all__ = ["CacheStore", "CacheUnavailable", "MemoryCacheStore", "RedisCacheStore"]


class CacheUnavailable(Exception):
    """The store did not answer (its message names the error class only)."""


class CacheStore(abc.ABC):
    """A bounded, expiring map of keys to bytes.

    Args:
        max_bytes: The most the values may take in all; a value larger than this is not
            stored.
    """

    #: Replicas share it: a generation in progress is claimed here, so that identical
    #: requests on other replicas wait for its answer instead of generating it again.
    shared = False

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes

    async def claim(self, key: str, owner: str, ttl_s: float) -> bool:
        """Claim the generation of ``key`` for ``owner`` for ``ttl_s`` (again: renew it);
        whether ``owner`` holds it. One process's store has no one to share with."""
        return True

    async def claimed(self, key: str) -> bool:
        """Whether some replica holds the claim of ``key``."""
        return False

    async def release(self, key: str, owner: str) -> None:  # noqa: B027 (none held here)
        """Give up ``owner``'s claim of ``key`` (another's stays)."""

    @abc.abstractmethod
    async def get(self, key: str) -> bytes | None:
        """The value under ``key``, if it is there and has not expired; marks it used."""

    @abc.abstractmethod
    async def put(self, key: str, value: bytes, ttl_s: float) -> None:
        """Store ``value`` under ``key`` for ``ttl_s`` seconds, evicting the least recently used
        entries until it fits; a value over ``max_bytes`` is dropped."""

    @abc.abstractmethod
    async def clear(self) -> None:
        """Forget every entry."""

    @abc.abstractmethod
    async def size(self) -> tuple[int, int]:
        """Entries and bytes held now (expired entries not yet evicted may count)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections."""


class MemoryCacheStore(CacheStore):
    """Entries in this process, in least-recently-used order."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(max_bytes)
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._bytes = 0

    async def get(self, key: str) -> bytes | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, value = entry
        if expires <= time.monotonic():
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return value

    async def put(self, key: str, value: bytes, ttl_s: float) -> None:
        if key in self._entries:
            self._drop(key)
        if len(value) > self.max_bytes or ttl_s <= 0:
            return
        while self._bytes + len(value) > self.max_bytes:
            self._drop(next(iter(self._entries)))
        self._entries[key] = (time.monotonic() + ttl_s, value)
        self._bytes += len(value)

    def _drop(self, key: str) -> None:
        _, value = self._entries.pop(key)
        self._bytes -= len(value)

    async def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0

    async def size(self) -> tuple[int, int]:
        return len(self._entries), self._bytes

    async def close(self) -> None:
        pass


# KEYS: the index (a sorted set of entry keys by last use), the sizes (a hash of entry key to
# its length), the entry. ARGV: value, ttl in ms, max bytes.
# Entries live as plain keys with a TTL; an entry that expired stays in the index until it
# is evicted or its key is put again, and its bytes count until then.
_PUT = """
local index, sizes, key = KEYS[1], KEYS[2], KEYS[3]
local value, ttl, max = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local old = redis.call('HGET', sizes, key)
if old then
  redis.call('HDEL', sizes, key)
  redis.call('ZREM', index, key)
  redis.call('HINCRBY', sizes, '', -tonumber(old))
  redis.call('DEL', key)
end
if #value > max or ttl <= 0 then return 0 end
local total = tonumber(redis.call('HGET', sizes, '') or '0')
while total + #value > max do
  local oldest = redis.call('ZPOPMIN', index)
  if #oldest == 0 then break end
  local size = tonumber(redis.call('HGET', sizes, oldest[1]) or '0')
  redis.call('HDEL', sizes, oldest[1])
  redis.call('DEL', oldest[1])
  total = redis.call('HINCRBY', sizes, '', -size)
end
redis.call('SET', key, value, 'PX', ttl)
redis.call('ZADD', index, now, key)
redis.call('HSET', sizes, key, #value)
redis.call('HINCRBY', sizes, '', #value)
return 1
"""

# KEYS: the index, the entry. Marks the entry used.
_GET = """
local value = redis.call('GET', KEYS[2])
if value then
  local t = redis.call('TIME')
  redis.call('ZADD', KEYS[1], 'XX', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000),
             KEYS[2])
end
return value
"""


# KEYS: the claim. ARGV: owner, ttl in ms. Takes a free claim, renews one's own.
_CLAIM = """
local holder = redis.call('GET', KEYS[1])
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

# KEYS: the claim. ARGV: owner.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class RedisCacheStore(CacheStore):
    """Entries in Redis, shared by every replica; each call is one Lua script.

    Args:
        client: Its client; closed by ``close()``. Build it with short timeouts, as
            ``from_url`` does: a slow cache must cost a request little.
        max_bytes: The bound on the values' bytes in all.
        prefix: The prefix of every key (the index and sizes live under it too).
        op_timeout_s: A deadline for one call.
    """

    def __init__(
        self,
        client: redis.asyncio.Redis,
        max_bytes: int,
        *,
        prefix: str = "tg:c",
        op_timeout_s: float = 0.2,
    ) -> None:
        super().__init__(max_bytes)
        self._client = client
        self._prefix = prefix
        self._index = f"{prefix}:index"
        self._sizes = f"{prefix}:sizes"
        self._timeout = op_timeout_s
        self._put: AsyncScript = client.register_script(_PUT)
        self._get: AsyncScript = client.register_script(_GET)
        self._claim: AsyncScript = client.register_script(_CLAIM)
        self._release: AsyncScript = client.register_script(_RELEASE)

    shared = True

    @classmethod
    def from_url(
        cls, url: str, max_bytes: int, *, timeout_s: float = 0.1, prefix: str = "tg:c"
    ) -> RedisCacheStore:
        """A store on a new client for ``url``; each call gives up after ``2 * timeout_s``.

        Raises:
            ValueError: the URL is not a Redis URL.
        """
        pool = redis.asyncio.BlockingConnectionPool.from_url(
            url,
            max_connections=50,
            timeout=timeout_s,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 1),
            health_check_interval=1,
        )
        client = redis.asyncio.Redis.from_pool(pool)
        return cls(client, max_bytes, prefix=prefix, op_timeout_s=2 * timeout_s)

    def _key(self, key: str) -> str:
        return f"{self._prefix}:e:{key}"

    async def get(self, key: str) -> bytes | None:
        try:
            async with asyncio.timeout(self._timeout):
                value = await self._get(keys=[self._index, self._key(key)])
        except (RedisError, OSError, TimeoutError) as exc:
            raise CacheUnavailable(type(exc).__name__) from None
        return value if isinstance(value, bytes) else None

    async def put(self, key: str, value: bytes, ttl_s: float) -> None:
        ttl_ms = int(ttl_s * 1000)
        try:
            async with asyncio.timeout(self._timeout):
                await self._put(
                    keys=[self._index, self._sizes, self._key(key)],
                    args=[value, ttl_ms, self.max_bytes],
                )
        except (RedisError, OSError, TimeoutError) as exc:
            raise CacheUnavailable(type(exc).__name__) from None

    def _flight(self, key: str) -> str:
        return f"{self._prefix}:f:{key}"

    async def claim(self, key: str, owner: str, ttl_s: float) -> bool:
        try:
            async with asyncio.timeout(self._timeout):
                held = await self._claim(keys=[self._flight(key)], args=[owner, int(ttl_s * 1000)])
        except (RedisError, OSError, TimeoutError) as exc:
            raise CacheUnavailable(type(exc).__name__) from None
        return bool(held)

    async def claimed(self, key: str) -> bool:
        try:
            async with asyncio.timeout(self._timeout):
                return bool(await self._client.exists(self._flight(key)))
        except (RedisError, OSError, TimeoutError) as exc:
            raise CacheUnavailable(type(exc).__name__) from None

    async def release(self, key: str, owner: str) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                await self._release(keys=[self._flight(key)], args=[owner])
        except (RedisError, OSError, TimeoutError) as exc:
            raise CacheUnavailable(type(exc).__name__) from None

    async def clear(self) -> None:
        try:
            async with asyncio.timeout(self._timeout * 10):
                keys = [k async for k in self._client.scan_iter(match=f"{self._prefix}:*")]
                for start in range(0, len(keys), 500):
                    await self._client.delete(*keys[start : start + 500])
        except (RedisError, OSError, TimeoutError) as exc:
            raise CacheUnavailable(type(exc).__name__) from None

    async def size(self) -> tuple[int, int]:
        try:
            async with asyncio.timeout(self._timeout):
                entries = await self._client.zcard(self._index)
                held = await self._client.hget(self._sizes, "")
        except (RedisError, OSError, TimeoutError) as exc:
            raise CacheUnavailable(type(exc).__name__) from None
        return int(entries), int(held or 0)

    async def close(self) -> None:
        await self._client.aclose()
