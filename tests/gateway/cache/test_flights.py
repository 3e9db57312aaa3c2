"""Single flight: followers replay what the generation made and follow it live; it is aborted
only when its last follower leaves; only a whole generation is stored.

The engine streams here are async generators that yield chunks when a test lets them: the
flight under test owns them exactly as it owns vLLM's (real engines: test_response_cache).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator

from gateway.cache import MemoryCacheStore, ResponseCache
from serving import ChoiceDelta, GenerationChunk, InvalidPrompt, SamplingOptions


class Source:
    """One prompt's engine stream, advanced a chunk at a time by the test."""

    def __init__(self, chunks: int, fail_at: int | None = None) -> None:
        self.chunks = chunks
        self.fail_at = fail_at
        self.go = asyncio.Semaphore(0)
        self.closed = False
        self.started = False

    async def stream(self) -> AsyncGenerator[GenerationChunk, None]:
        self.started = True
        try:
            for i in range(self.chunks):
                await self.go.acquire()
                if i == self.fail_at:
                    raise InvalidPrompt("refused late")
                last = i == self.chunks - 1
                yield GenerationChunk(
                    choices=[
                        ChoiceDelta(
                            index=0,
                            text=f"t{i} ",
                            num_tokens=1,
                            finish_reason="length" if last else None,
                        )
                    ],
                    prompt_tokens=3,
                    cached_tokens=0,
                    finished=last,
                )
        finally:
            self.closed = True


def cache() -> ResponseCache:
    return ResponseCache(MemoryCacheStore(1 << 20), ttl_s=60)


KEY_ARGS = {
    "tenant": "t",
    "model": "m",
    "model_digest": "d",
    "prompts": [[1, 2, 3]],
    "options": SamplingOptions(4, temperature=0),
}


async def collect(flight_items: AsyncGenerator[tuple[int, GenerationChunk], None]) -> str:
    async with contextlib.aclosing(flight_items) as items:
        return "".join([chunk.choices[0].text async for _, chunk in items])


async def test_a_late_follower_replays_then_follows_and_the_result_is_stored() -> None:
    responses = cache()
    key = responses.key(**KEY_ARGS)  # type: ignore[arg-type]
    source = Source(4)
    flight = responses.start(key, [source.stream()], store=True)
    first = asyncio.create_task(collect(flight.follow()))
    source.go.release()
    source.go.release()
    await asyncio.sleep(0.01)
    joined = responses.join(key)
    assert joined is flight
    second = asyncio.create_task(collect(joined.follow()))
    source.go.release()
    source.go.release()
    assert await first == await second == "t0 t1 t2 t3 "
    await flight.wait()
    await asyncio.sleep(0)
    assert responses.join(key) is None  # done and gone from the flights
    recording = await responses.lookup(key)
    assert recording is not None
    assert "".join(c.choices[0].text for _, c in recording.items) == "t0 t1 t2 t3 "


async def test_the_generation_stops_only_when_its_last_follower_leaves() -> None:
    responses = cache()
    key = responses.key(**KEY_ARGS)  # type: ignore[arg-type]
    source = Source(10)
    flight = responses.start(key, [source.stream()], store=True)
    leaving = [asyncio.create_task(collect(flight.follow())) for _ in range(2)]
    source.go.release()
    await asyncio.sleep(0.01)
    leaving[0].cancel()
    await asyncio.gather(leaving[0], return_exceptions=True)
    assert not source.closed  # one follower is still there
    leaving[1].cancel()
    await asyncio.gather(leaving[1], return_exceptions=True)
    await flight.wait()
    assert source.closed  # aborted in the engine
    assert await responses.lookup(key) is None  # nothing half-made is stored
    assert key not in responses.flights


async def test_a_failed_generation_fails_every_follower_and_is_not_shared_again() -> None:
    responses = cache()
    key = responses.key(**KEY_ARGS)  # type: ignore[arg-type]
    source = Source(5, fail_at=2)
    flight = responses.start(key, [source.stream()], store=True)
    followers = [asyncio.create_task(collect(flight.follow())) for _ in range(3)]
    for _ in range(3):
        source.go.release()
    results = await asyncio.gather(*followers, return_exceptions=True)
    assert all(isinstance(r, InvalidPrompt) for r in results)
    assert responses.join(key) is None
    assert await responses.lookup(key) is None
