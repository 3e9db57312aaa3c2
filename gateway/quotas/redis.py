"""The Redis quota store: counters shared by every gateway replica.

Each ``admit`` and each ``settle`` is one Lua script (``EVALSHA``), so a check and its
reservation are one atomic step on the server, whatever the number of replicas; time comes
from the server (``TIME``), never from a replica's clock. The key layout is in
``gateway.quotas._lua``. Every error of the client (refused connection, timeout, a server
still loading its data, any other ``RedisError``) surfaces as ``StoreUnavailable``, whose
message names the error class only: never the URL, its host or its password.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping, Sequence

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, RedisError

from gateway.quotas import _lua
from gateway.quotas._common import (
    RECORD_MARGIN_S,
    TOMBSTONE_TTL_S,
    check_admission,
    check_partition,
    check_settlement,
)
from gateway.quotas.store import (
    Decision,
    Demand,
    Dimension,
    Limits,
    QuotaStore,
    Scope,
    ScopeUsage,
    StoreUnavailable,
)

__all__ = ["RedisQuotaStore"]

#: Seconds between PINGs on a pooled connection that sat idle.
HEALTH_CHECK_INTERVAL_S = 1
#: Connections one store opens at most; more calls at once wait for one (a burst of
#: admissions queues instead of failing).
MAX_CONNECTIONS = 100

# Dimension codes of the admit script, in check order.
_DIMENSIONS = (
    Dimension.MONTHLY_SPEND,
    Dimension.MONTHLY_TOKENS,
    Dimension.DAILY_TOKENS,
    Dimension.CONCURRENCY,
    Dimension.RPM,
    Dimension.TPM,
)


class RedisQuotaStore(QuotaStore):
    """Quota counters in Redis (or a Redis cluster: a partition is one hash slot).

    Args:
        client: the client to use; the store closes it on ``close()``. Build it without
            retries and with short socket timeouts, as ``from_url`` does, or an outage
            stalls every request.
        window_s: the length of the requests and tokens window, in seconds.
        prefix: the prefix of every key.
        op_timeout_s: an overall deadline for one store call, or ``None`` for only the
            client's socket timeouts.
    """

    def __init__(
        self,
        client: redis.asyncio.Redis,
        *,
        window_s: int = 60,
        prefix: str = "tg:q",
        op_timeout_s: float | None = None,
    ) -> None:
        if window_s < 1:
            raise ValueError("window_s must be at least 1")
        self._client = client
        self._window_s = window_s
        self._prefix = prefix
        self._op_timeout_s = op_timeout_s
        self._admit = client.register_script(_lua.ADMIT)
        self._settle = client.register_script(_lua.SETTLE)
        self._usage = client.register_script(_lua.USAGE)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        timeout_s: float = 0.15,
        window_s: int = 60,
        max_connections: int = MAX_CONNECTIONS,
    ) -> RedisQuotaStore:
        """A store on a new client for ``url`` that gives up after ``timeout_s``.

        Connecting, each reply and waiting for a free pooled connection take ``timeout_s`` at
        most each; a whole call, ``2 * timeout_s``. Nothing connects before the first call.
        A call whose connection fails is retried once, at once, on a new connection: after a
        Redis restart every pooled connection is stale, and without the retry each would
        fail one call. (A retried admission whose first reply was lost finds its own
        reservation and is refused: its id is taken; a retried settlement applies once.)

        Raises:
            ValueError: the URL is not a Redis URL.
        """
        pool = redis.asyncio.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=timeout_s,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 1),
            health_check_interval=HEALTH_CHECK_INTERVAL_S,
        )
        client = redis.asyncio.Redis.from_pool(pool)
        return cls(client, window_s=window_s, op_timeout_s=2 * timeout_s)

    async def admit(
        self, partition: str, scopes: Sequence[Scope], demand: Demand, lease_s: float
    ) -> Decision:
        check_admission(partition, scopes, demand, lease_s)
        base = self._base(partition)
        keys = [base, *(f"{base}:{scope.name}" for scope in scopes)]
        args: list[str | int] = [
            demand.request_id,
            demand.tokens,
            demand.spend_nusd,
            max(1, math.ceil(lease_s * 1000)),
            self._window_s,
            RECORD_MARGIN_S * 1000,
        ]
        for scope in scopes:
            args.extend(_limit_args(scope.limits))
        reply = _ints(await self._run(self._admit, keys, args), 10)
        admitted, dim, index, retry_ms = reply[:4]
        return Decision(
            admitted=bool(admitted),
            dimension=_DIMENSIONS[dim - 1] if dim else None,
            scope=scopes[index - 1].name if dim else None,
            retry_after_s=retry_ms / 1000 if dim else None,
            limit_requests=_opt(reply[4]),
            remaining_requests=_opt(reply[5]),
            reset_requests_s=_opt_s(reply[6]),
            limit_tokens=_opt(reply[7]),
            remaining_tokens=_opt(reply[8]),
            reset_tokens_s=_opt_s(reply[9]),
        )

    async def settle(self, partition: str, request_id: str, tokens: int, spend_nusd: int) -> bool:
        check_settlement(partition, request_id, tokens, spend_nusd)
        args: list[str | int] = [request_id, tokens, spend_nusd, self._window_s, TOMBSTONE_TTL_S]
        reply = await self._run(self._settle, [self._base(partition)], args)
        return reply == 1

    async def settle_and_add(
        self,
        partition: str,
        request_id: str,
        tokens: int,
        spend_nusd: int,
        stream: str,
        fields: Mapping[bytes, bytes],
    ) -> tuple[bool | None, bool]:
        """`settle`, and ``XADD stream fields``, in one round trip (a pipeline).

        Returns:
            Whether the settlement applied (``None``: it failed on the server and must be
            retried), and whether the entry was added.

        Raises:
            StoreUnavailable: the store did not answer; neither outcome is known (retrying
                either is safe: the settlement applies once, and the entry's consumer
                ignores a second copy of an event).
        """
        check_settlement(partition, request_id, tokens, spend_nusd)
        args: list[str | int] = [request_id, tokens, spend_nusd, self._window_s, TOMBSTONE_TTL_S]
        pipe = self._client.pipeline(transaction=False)
        # EVALSHA directly: a pipeline holding a Script object checks SCRIPT EXISTS first,
        # which is one more round trip.
        pipe.evalsha(self._settle.sha, 1, self._base(partition), *args)
        pipe.xadd(stream, dict(fields))  # type: ignore[arg-type]
        try:
            async with asyncio.timeout(self._op_timeout_s):
                settled, added = await pipe.execute(raise_on_error=False)
        except (RedisError, OSError) as exc:
            raise _unavailable(exc) from exc
        if isinstance(settled, NoScriptError):  # a restarted server: load it and settle
            settled = await self.settle(partition, request_id, tokens, spend_nusd)
        elif isinstance(settled, BaseException):
            settled = None
        return (None if settled is None else settled == 1), not isinstance(added, BaseException)

    async def usage(self, partition: str, scope: str) -> ScopeUsage:
        check_partition(partition)
        key = f"{self._base(partition)}:{scope}"
        reply = await self._run(self._usage, [key], [self._window_s, RECORD_MARGIN_S * 1000])
        values = _ints(reply, 7)
        return ScopeUsage(
            requests_in_window=values[0],
            tokens_in_window=values[1],
            in_flight=values[2],
            daily_tokens=values[3],
            monthly_tokens=values[4],
            monthly_spend_nusd=values[5],
            open_reservations=values[6],
        )

    async def ping(self) -> None:
        try:
            async with asyncio.timeout(self._op_timeout_s):
                await self._client.ping()
        except (RedisError, OSError) as exc:
            raise _unavailable(exc) from exc

    async def close(self) -> None:
        await self._client.aclose()

    def _base(self, partition: str) -> str:
        return f"{self._prefix}:{{{partition}}}"

    async def _run(self, script: AsyncScript, keys: list[str], args: list[str | int]) -> object:
        try:
            async with asyncio.timeout(self._op_timeout_s):
                result: object = await script(keys=keys, args=args)
        except (RedisError, OSError) as exc:
            # TimeoutError (asyncio's deadline, a socket's) is an OSError.
            raise _unavailable(exc) from exc
        return result


def _unavailable(exc: BaseException) -> StoreUnavailable:
    # Only the class name: redis-py's messages carry the host and port.
    return StoreUnavailable(f"quota store unavailable ({type(exc).__name__})")


def _limit_args(limits: Limits) -> list[int]:
    values = (
        limits.rpm,
        limits.tpm,
        limits.max_concurrency,
        limits.daily_tokens,
        limits.monthly_tokens,
        limits.monthly_spend_nusd,
    )
    return [-1 if value is None else value for value in values]


def _ints(reply: object, n: int) -> list[int]:
    if not isinstance(reply, list) or len(reply) != n:
        raise StoreUnavailable("quota store sent an unexpected reply")
    return [int(value) for value in reply]


def _opt(value: int) -> int | None:
    return None if value < 0 else value


def _opt_s(value_ms: int) -> float | None:
    return None if value_ms < 0 else value_ms / 1000
