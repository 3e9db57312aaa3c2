"""The response cache and single flight: a deterministic request's generation, once.

A request is deterministic when its sampling cannot vary: ``temperature`` 0, or an explicit
``seed``. Its key is a digest of its namespace, the model (its catalog entry, so a model
reconfigured under the same name starts afresh), the rendered prompt tokens of every prompt
and every sampling option; the output's shape (chat or text, streamed or not) is not part of
it, because what is cached is the engine's output, a `Recording` of its chunks, which each
answer renders for itself.

- A **hit** finds the recording in the store and never reaches the engine.
- Otherwise, a request whose key is being generated right now **shares** that generation
  (single flight): it replays what the generation produced so far and follows it live.
- Otherwise it is a **miss**: it starts a `Flight`, the generation in a task of its own that
  every caller of the key follows, the first one included. The flight ends when the engine
  is done, or when its last caller has gone (then the engine's requests are aborted); one
  that ran to the end stores its recording for later hits.

On a store that replicas share (Redis), the flight of a key is also claimed in the store for
as long as it runs: an identical request on another replica that finds the claim waits for
the recording (polling the store) and answers from it, **shared**, instead of generating it
again; when the claim goes without a recording (the generation failed, its replica died),
the request claims the key and generates it itself. Followers on the flight's own replica
stream live; followers on other replicas get the answer once it is complete.

The namespace is the tenant by default, so a tenant's keys share their answers and nothing
crosses tenants; an operator may share a model's answers across tenants.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import hashlib
import logging
import secrets
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence

import msgspec

from gateway.cache.store import CacheStore, CacheUnavailable
from serving import GenerationChunk, SamplingOptions, ServingError

__all__ = [
    "CacheMode",
    "CacheStatus",
    "Flight",
    "Recording",
    "ResponseCache",
    "deterministic",
    "run_streams",
]

logger = logging.getLogger(__name__)

#: How long a replica's claim of a generation lasts unless renewed (it dies, it expires).
_CLAIM_TTL_S = 6.0
#: How often a request waiting for another replica's generation looks for its answer.
_POLL_S = 0.02

#: One engine chunk of one prompt of a call.
Item = tuple[int, GenerationChunk]


class CacheStatus(enum.StrEnum):
    """How an answer relates to the response cache (``x-tollgate-cache``)."""

    HIT = "hit"
    MISS = "miss"
    SHARED = "shared"
    #: Not looked up: not deterministic, the client said ``no-store``, or the cache is off.
    BYPASS = "bypass"


class CacheMode(enum.Enum):
    """What the client allows (``Cache-Control`` of the request)."""

    #: Look up, share and store.
    USE = "use"
    #: ``no-cache``: compute afresh (no lookup, no sharing), then store.
    REFRESH = "refresh"
    #: ``no-store``: neither look up nor store nor share.
    OFF = "off"

    @classmethod
    def of(cls, header: str | None) -> CacheMode:
        if not header:
            return cls.USE
        directives = {part.strip().split("=", 1)[0].lower() for part in header.split(",")}
        if "no-store" in directives:
            return cls.OFF
        if "no-cache" in directives:
            return cls.REFRESH
        return cls.USE


class Recording(msgspec.Struct, array_like=True):
    """What the engine produced for a call: its chunks in order of arrival."""

    items: list[Item]


_encode_recording = msgspec.msgpack.Encoder().encode
_decode_recording = msgspec.msgpack.Decoder(Recording).decode
_encode_key = msgspec.msgpack.Encoder().encode


def deterministic(options: SamplingOptions) -> bool:
    """Whether the same request always gets the same answer."""
    return options.temperature == 0 or options.seed is not None


async def run_streams(
    streams: Sequence[AsyncGenerator[GenerationChunk, None]],
    on_item: Callable[[int, GenerationChunk], Awaitable[None]],
) -> None:
    """Run every prompt's engine stream, handing each chunk to ``on_item`` in order of arrival.

    Each stream runs in a task of its own and is closed (aborted in the engine) on any early
    end.

    Raises:
        ServingError: the first serving error of any prompt (the others are aborted).
    """
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]) as chunks:
            async for chunk in chunks:
                await on_item(0, chunk)
        return
    queue: asyncio.Queue[Item | None] = asyncio.Queue()

    async def feed(p: int, stream: AsyncGenerator[GenerationChunk, None]) -> None:
        try:
            async with contextlib.aclosing(stream) as chunks:
                async for chunk in chunks:
                    queue.put_nowait((p, chunk))
        finally:
            queue.put_nowait(None)

    try:
        async with asyncio.TaskGroup() as group:
            for p, stream in enumerate(streams):
                group.create_task(feed(p, stream))
            running = len(streams)
            while running:
                item = await queue.get()
                if item is None:
                    running -= 1
                else:
                    await on_item(*item)
    except* ServingError as failed:
        raise failed.exceptions[0] from None


class Flight:
    """One generation that every caller of its key follows.

    Args:
        key: The cache key.
        streams: The engine streams of the first caller's prompts (not yet started).
        on_done: Called once with the flight when it ends, successfully or not.
    """

    def __init__(
        self,
        key: str,
        streams: Sequence[AsyncGenerator[GenerationChunk, None]],
        on_done: Callable[[Flight], Awaitable[None]],
    ) -> None:
        self.key = key
        self.items: list[Item] = []
        self.done = False
        self.error: ServingError | None = None
        self.followers = 0
        self._changed = asyncio.Event()
        self._streams = streams
        self._on_done = on_done
        self._task = asyncio.create_task(self._run(), name=f"flight-{key[:12]}")

    async def _run(self) -> None:
        async def add(p: int, chunk: GenerationChunk) -> None:
            self.items.append((p, chunk))
            self._wake()

        try:
            await run_streams(self._streams, add)
        except ServingError as exc:
            self.error = exc
        except asyncio.CancelledError:
            self.error = ServingError("the generation was abandoned")
            raise
        except Exception as exc:  # a bug: the followers answer an error, never hang
            logger.exception("generation of flight %s failed", self.key[:12])
            self.error = ServingError(f"{type(exc).__name__}")
        finally:
            self.done = True
            self._wake()
            await asyncio.shield(self._on_done(self))

    def _wake(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    @property
    def complete(self) -> bool:
        """Ran to the end without error: its recording may serve later requests."""
        return self.done and self.error is None

    async def follow(self) -> AsyncGenerator[Item, None]:
        """Every item from the first, then live ones until the end.

        Iterate it inside ``contextlib.aclosing``: when the last follower closes it before the
        end, the generation is aborted.

        Raises:
            ServingError: the generation failed (the same error for every follower).
        """
        self.followers += 1
        try:
            sent = 0
            while True:
                while sent < len(self.items):
                    yield self.items[sent]
                    sent += 1
                if self.done:
                    if self.error is not None:
                        raise self.error
                    return
                await self._changed.wait()
        finally:
            self.followers -= 1
            if self.followers == 0 and not self.done:
                self._task.cancel()

    async def wait(self) -> None:
        """Until the flight's task has ended (tests, shutdown)."""
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


class ResponseCache:
    """The response cache and the flights in progress of one gateway process.

    Args:
        store: Where recordings live.
        ttl_s: How long a recording serves hits.
        enabled: Off: every request is a bypass.
        shared_models: Models whose answers are shared across tenants.
    """

    def __init__(
        self,
        store: CacheStore,
        *,
        ttl_s: float = 300.0,
        enabled: bool = True,
        shared_models: Sequence[str] = (),
    ) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self.enabled = enabled
        self.shared_models = frozenset(shared_models)
        self.flights: dict[str, Flight] = {}
        #: Answers per (model, status).
        self.counts: collections.Counter[tuple[str, CacheStatus]] = collections.Counter()
        self._warned_at = 0.0
        #: This replica's name in the claims of the shared store.
        self.owner = secrets.token_hex(8)

    def key(
        self,
        *,
        tenant: str,
        model: str,
        model_digest: str,
        prompts: Sequence[Sequence[int]],
        options: SamplingOptions,
    ) -> str:
        """The cache key of a request (a hex digest)."""
        namespace = "*" if model in self.shared_models else tenant
        material = _encode_key([namespace, model, model_digest, prompts, options])
        return hashlib.blake2b(material, digest_size=20).hexdigest()

    async def lookup(self, key: str) -> Recording | None:
        """A stored recording, or ``None``; a store that fails is a miss."""
        try:
            raw = await self.store.get(key)
        except CacheUnavailable as exc:
            self._warn("lookup", exc)
            return None
        if raw is None:
            return None
        try:
            return _decode_recording(raw)
        except msgspec.DecodeError:  # written by another version; recompute it
            return None

    async def elsewhere(self, key: str, *, wait_s: float = 600.0) -> Recording | None:
        """When another replica is generating ``key``: its recording, once stored.

        ``None`` means this replica must generate it (and now holds the claim, or the store
        cannot say): the store is not shared, no one else claimed the key, or the claim went
        without a recording.
        """
        store = self.store
        if not store.shared:
            return None
        try:
            if await store.claim(key, self.owner, _CLAIM_TTL_S):
                return None
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                await asyncio.sleep(_POLL_S)
                recording = await self.lookup(key)
                if recording is not None:
                    return recording
                if not await store.claimed(key) and await store.claim(
                    key, self.owner, _CLAIM_TTL_S
                ):
                    return None
        except CacheUnavailable as exc:
            self._warn("claim", exc)
        return None

    def join(self, key: str) -> Flight | None:
        """The flight of ``key`` in progress, if there is one that can still be shared."""
        flight = self.flights.get(key)
        if flight is None or (flight.done and not flight.complete):
            return None
        return flight

    def start(
        self, key: str, streams: Sequence[AsyncGenerator[GenerationChunk, None]], *, store: bool
    ) -> Flight:
        """A new flight of ``key`` on ``streams``; ``store``: keep its recording for hits."""

        renew = asyncio.create_task(self._hold(key)) if self.store.shared else None

        async def done(flight: Flight) -> None:
            try:
                if store and flight.complete and _cacheable(flight.items):
                    raw = _encode_recording(Recording(flight.items))
                    try:
                        await self.store.put(key, raw, self.ttl_s)
                    except CacheUnavailable as exc:
                        self._warn("store", exc)
            finally:
                if self.flights.get(key) is flight:
                    del self.flights[key]
                if renew is not None:
                    renew.cancel()
                    with contextlib.suppress(CacheUnavailable):
                        await self.store.release(key, self.owner)

        flight = Flight(key, streams, done)
        self.flights[key] = flight
        return flight

    async def _hold(self, key: str) -> None:
        """Renew this replica's claim of ``key`` while its flight runs."""
        while True:
            await asyncio.sleep(_CLAIM_TTL_S / 3)
            with contextlib.suppress(CacheUnavailable):
                await self.store.claim(key, self.owner, _CLAIM_TTL_S)

    def count(self, model: str, status: CacheStatus) -> None:
        self.counts[(model, status)] += 1

    def _warn(self, what: str, exc: CacheUnavailable) -> None:
        now = time.monotonic()
        if now - self._warned_at > 10:
            self._warned_at = now
            logger.warning("response cache %s failed (%s): serving without it", what, exc)

    async def close(self) -> None:
        for flight in list(self.flights.values()):
            flight._task.cancel()
            await flight.wait()
        await self.store.close()


def _cacheable(items: Sequence[Item]) -> bool:
    """A recording that ended as the engine meant it to (no abort, no error)."""
    return all(
        choice.finish_reason not in ("abort", "error")
        for _, chunk in items
        for choice in chunk.choices
    )
