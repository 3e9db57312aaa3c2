"""The worker registry in Redis: each worker's `WorkerInfo`, refreshed by its heartbeat.

Keys, per deployment::

    tollgate:{deployment}:workers            set of worker ids
    tollgate:{deployment}:worker:{id}        its WorkerInfo (JSON), expiring ``ttl_s`` after
                                             the last heartbeat

A worker that dies stops refreshing its key and drops out of every reader's view within
``ttl_s``; one that drains says so at once and deletes its key when it is done.
"""

from __future__ import annotations

import logging
import time

import msgspec
import redis.asyncio as redis

from serving.wire import WorkerInfo

__all__ = ["WorkerRegistry"]

logger = logging.getLogger(__name__)

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(WorkerInfo).decode


class WorkerRegistry:
    def __init__(self, client: redis.Redis, deployment: str, *, ttl_s: float = 4.0) -> None:
        self._redis = client
        self._index = f"tollgate:{deployment}:workers"
        self._prefix = f"tollgate:{deployment}:worker:"
        self.ttl_s = ttl_s

    @classmethod
    def from_url(cls, url: str, deployment: str, *, ttl_s: float = 4.0) -> WorkerRegistry:
        client = redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
        return cls(client, deployment, ttl_s=ttl_s)

    async def publish(self, info: WorkerInfo) -> None:
        info.heartbeat_at = time.time()
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.sadd(self._index, info.id)
            pipe.set(self._prefix + info.id, _encode(info), px=int(self.ttl_s * 1000))
            await pipe.execute()

    async def remove(self, worker_id: str) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.delete(self._prefix + worker_id)
            pipe.srem(self._index, worker_id)
            await pipe.execute()

    async def workers(self) -> list[WorkerInfo]:
        """Every worker whose heartbeat is fresh; ids whose key expired leave the index."""
        members = await self._redis.smembers(self._index)
        ids = sorted(m.decode() if isinstance(m, bytes) else m for m in members)
        if not ids:
            return []
        values = await self._redis.mget([self._prefix + i for i in ids])
        found, gone = [], []
        for worker_id, value in zip(ids, values, strict=True):
            if value is None:
                gone.append(worker_id)
                continue
            try:
                found.append(_decode(value))
            except msgspec.DecodeError:
                logger.warning("worker %s published a record this gateway cannot read", worker_id)
        if gone:
            await self._redis.srem(self._index, *gone)
        return found

    async def close(self) -> None:
        await self._redis.aclose()
