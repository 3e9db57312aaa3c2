"""The admission queue: weighted fair shares, classes, work conservation, bounds."""

from __future__ import annotations

import asyncio
import random

import pytest

from serving import FairQueue, QueueFull, RequestContext


async def test_a_free_slot_is_taken_at_once() -> None:
    queue = FairQueue(slots=2, max_queued=0)
    assert await queue.acquire(RequestContext(group="a"), 10) == 0.0
    assert await queue.acquire(RequestContext(group="b"), 10) == 0.0
    with pytest.raises(QueueFull):  # nobody may wait
        await queue.acquire(RequestContext(group="a"), 10)
    queue.release(RequestContext(group="a"))
    assert await queue.acquire(RequestContext(group="a"), 10) == 0.0


async def serve(
    queue: FairQueue, context: RequestContext, order: list[str], output_tokens: int
) -> None:
    await queue.acquire(context, 20)
    try:
        order.append(context.group)
        await asyncio.sleep(0)
        queue.charge(context, output_tokens)
    finally:
        queue.release(RequestContext())


async def test_backlogged_groups_are_served_tokens_by_their_weights() -> None:
    queue = FairQueue(slots=1, max_queued=10_000)
    heavy = RequestContext(group="heavy", weight=3.0)
    light = RequestContext(group="light", weight=1.0)
    order: list[str] = []
    # Both keep many requests waiting; request sizes differ between the groups.
    rng = random.Random(7)  # noqa: S311 (sizes, not secrets)
    tasks = [
        asyncio.create_task(serve(queue, heavy if i % 2 else light, order, rng.randint(10, 40)))
        for i in range(2000)
    ]
    for _ in range(100_000):  # while both are still backlogged
        if len(order) >= 800:
            break
        await asyncio.sleep(0)
    served = dict(queue.served)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert served["heavy"] / served["light"] == pytest.approx(3.0, rel=0.15)


async def test_interactive_goes_before_batch_and_a_newcomer_banks_no_credit() -> None:
    queue = FairQueue(slots=1, max_queued=100)
    busy = RequestContext(group="x")
    await queue.acquire(busy, 1)  # the slot is busy
    order: list[str] = []
    batch = [
        asyncio.create_task(serve(queue, RequestContext(group="b", priority="batch"), order, 5))
        for _ in range(3)
    ]
    await asyncio.sleep(0)
    inter = asyncio.create_task(serve(queue, RequestContext(group="i"), order, 5))
    await asyncio.sleep(0)
    queue.release(busy)
    await asyncio.gather(inter, *batch)
    assert order == ["i", "b", "b", "b"]
    # A group idle all along starts level with the others, not with a counter of zero.
    assert queue.counters["i"] > 0


async def test_a_waiter_cancelled_holds_nothing() -> None:
    queue = FairQueue(slots=1, max_queued=10)
    await queue.acquire(RequestContext(), 1)
    waiting = asyncio.create_task(queue.acquire(RequestContext(group="w"), 1))
    await asyncio.sleep(0)
    assert queue.queued == 1
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert queue.queued == 0
    queue.release(RequestContext())
    assert queue.running == 0
    assert await queue.acquire(RequestContext(), 1) == 0.0


async def test_more_slots_let_waiters_in_at_once() -> None:
    queue = FairQueue(slots=1, max_queued=10)
    await queue.acquire(RequestContext(), 1)
    waiters = [
        asyncio.create_task(queue.acquire(RequestContext(group=str(i)), 1)) for i in range(3)
    ]
    await asyncio.sleep(0)
    assert queue.queued == 3
    queue.slots = 4
    waited = await asyncio.gather(*waiters)
    assert all(w >= 0 for w in waited)
    assert (queue.running, queue.queued) == (4, 0)


async def test_a_group_under_its_share_does_not_wait_behind_a_flood() -> None:
    queue = FairQueue(slots=4, max_queued=100)
    flood = RequestContext(group="flood")
    for _ in range(4):
        await queue.acquire(flood, 1)
    more_flood = asyncio.create_task(queue.acquire(flood, 1))
    await asyncio.sleep(0)
    assert queue.queued == 1  # the flood is over its share: it waits
    light = RequestContext(group="light")
    assert await queue.acquire(light, 1) == 0.0  # under its share: a reserve slot at once
    assert await queue.acquire(light, 1) == 0.0
    assert queue.running == 6
    third = asyncio.create_task(queue.acquire(light, 1))  # at its share now, and no slot
    await asyncio.sleep(0)
    assert queue.queued == 2
    for _ in range(4):  # 2 running: both waiters go in
        queue.release(flood)
    await asyncio.sleep(0)
    assert third.done()
    assert more_flood.done()
    assert (queue.running, queue.queued) == (4, 0)
