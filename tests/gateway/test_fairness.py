"""Fair batching on the real engine: weighted shares between flooding tenants, and a light
tenant that a flood does not drown.

The engine's queue is narrowed to a few slots through the live serving policy, so that the
queue, not the machine, decides who is served; the tests put it back afterwards.
"""

from __future__ import annotations

import asyncio
import secrets
import statistics
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import Gateway, wait_idle
from tests.support.admin import Admin

MODEL = "demo-chat"


def completion(tag: str, max_tokens: int) -> dict[str, Any]:
    return {
        "model": MODEL,
        "prompt": f"{tag} {secrets.token_hex(4)}",
        "max_tokens": max_tokens,
        "temperature": 0.9,
        "ignore_eos": True,
    }


@pytest.fixture
def narrow(admin: Admin, request: pytest.FixtureRequest) -> Iterator[None]:
    slots = getattr(request, "param", 4)
    answer = admin.http.patch("/serving", json={"models": {MODEL: {"slots": slots}}})
    assert answer.status_code == 200, answer.text
    assert answer.json()["models"][MODEL]["slots"] == slots
    yield
    answer = admin.http.patch("/serving", json={"models": None, "tenants": None})
    assert answer.status_code == 200, answer.text


def client(gateway: Gateway, key: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=gateway.api_url,
        headers={"authorization": f"Bearer {key}"},
        timeout=300,
        limits=httpx.Limits(max_connections=200),
    )


async def timed(api: httpx.AsyncClient, body: dict[str, Any]) -> tuple[float, float, int, float]:
    """(latency, finish time, completion tokens, time let in to the engine) of one call."""
    began = time.monotonic()
    reply = await api.post("/completions", json=body)
    assert reply.status_code == 200, reply.text
    waited = float(reply.headers["x-tollgate-queue-ms"]) / 1000
    done = time.monotonic()
    return done - began, done, reply.json()["usage"]["completion_tokens"], began + waited


#: Requests per tenant: enough that the light tenant has some twenty in the measured window,
#: so that one request more or less at its edges moves the ratio by a few percent only.
REQUESTS = 96


async def test_backlogged_tenants_are_served_by_their_weights(
    gateway: Gateway, admin: Admin, http: httpx.Client, narrow: None
) -> None:
    tenants = [admin.tenant("weighted-" + secrets.token_hex(3)) for _ in range(2)]
    keys = [admin.key(t) for t in tenants]
    answer = admin.http.patch(
        "/serving", json={"tenants": {tenants[0]: {"weight": 3}, tenants[1]: {"weight": 1}}}
    )
    assert answer.status_code == 200, answer.text
    wait_idle(http, MODEL)
    async with client(gateway, keys[0]) as heavy, client(gateway, keys[1]) as other:
        runs = [
            asyncio.gather(*(timed(api, completion(tag, 48)) for _ in range(REQUESTS)))
            for api, tag in ((heavy, "three"), (other, "one"))
        ]
        three, one = await asyncio.gather(*runs)
    # While both had requests waiting (until the first tenant's last one was let in, and after
    # the first quarter of that, when the engine started empty), tokens were served 3:1: each
    # request's tokens spread over its time in the engine, counted within that window.
    until = min(max(a for *_, a in three), max(a for *_, a in one))
    first = min(a for results in (three, one) for *_, a in results)
    since = first + (until - first) / 4
    served = [
        sum(
            tokens * max(0.0, min(done, until) - max(admitted, since)) / (done - admitted)
            for _, done, tokens, admitted in results
            if done > admitted
        )
        for results in (three, one)
    ]
    assert served[1] > 0
    assert served[0] / served[1] == pytest.approx(3.0, rel=0.15), served


@pytest.mark.parametrize("narrow", [4], indirect=True)
async def test_a_flood_does_not_drown_a_light_tenant(
    gateway: Gateway, admin: Admin, http: httpx.Client, narrow: None
) -> None:
    light_key = admin.key(admin.tenant("light-" + secrets.token_hex(3)))
    flood_key = admin.key(admin.tenant("flood-" + secrets.token_hex(3)))

    async def light_run(api: httpx.AsyncClient) -> list[float]:
        latencies = []
        for _ in range(6):
            pair = await asyncio.gather(*(timed(api, completion("light", 32)) for _ in range(2)))
            latencies += [latency for latency, *_ in pair]
        return latencies

    wait_idle(http, MODEL)
    async with client(gateway, light_key) as light:
        alone = statistics.median(await light_run(light))
        async with client(gateway, flood_key) as flood:
            # Ten times the light tenant's load, all at once.
            flooding = asyncio.gather(*(timed(flood, completion("flood", 64)) for _ in range(120)))
            await asyncio.sleep(0.5)  # the flood has filled the queue
            loaded = statistics.median(await light_run(light))
            await flooding
    assert loaded <= 2 * alone, (alone, loaded)
