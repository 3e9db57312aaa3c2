"""Deterministic requests: single flight while in progress, the response cache afterwards.

Against the shared gateway and its real engine: the engine's own counter of finished
requests tells how many sequences it ran; the ledger tells what each caller was billed.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import httpx
import pytest

from billing.events import CacheTier
from billing.pricing import Price, rate
from tests.conftest import Gateway, engine_stats, wait_idle
from tests.support.admin import Admin
from tests.support.waits import events_of

MODEL = "demo-chat"


def chat(prompt: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 48,
        "temperature": 0,
        "ignore_eos": True,
        **extra,
    }


async def answer(http: httpx.AsyncClient, body: dict[str, Any]) -> tuple[str, str, str]:
    """(text, x-tollgate-cache, request id) of one call, streamed or not."""
    if not body.get("stream"):
        reply = await http.post("/v1/chat/completions", json=body)
        assert reply.status_code == 200, reply.text
        text = reply.json()["choices"][0]["message"]["content"]
        return text, reply.headers["x-tollgate-cache"], reply.headers["x-request-id"]
    parts = []
    async with http.stream("POST", "/v1/chat/completions", json=body) as reply:
        assert reply.status_code == 200
        headers = reply.headers
        async for line in reply.aiter_lines():
            if line.startswith("data: {"):
                chunk = httpx.Response(200, content=line[6:]).json()
                for choice in chunk["choices"]:
                    parts.append(choice["delta"].get("content") or "")
    return "".join(parts), headers["x-tollgate-cache"], headers["x-request-id"]


PRICE = {
    "input_per_mtok": "2",
    "cached_input_per_mtok": "0.5",
    "output_per_mtok": "8",
    "response_input_per_mtok": "0.25",
    "response_output_per_mtok": "1",
}
T0 = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture
def priced(admin: Admin) -> Iterator[None]:
    """demo-chat at ``PRICE`` for the test; the price before it is back afterwards."""
    before = [p for p in admin.http.get("/prices").json()["data"] if p["model"] == MODEL]
    assert admin.http.put(f"/prices/{MODEL}", json=PRICE).status_code == 200
    yield
    if before:
        latest = max(before, key=lambda p: p["effective_from"])
        restored = {k: latest[k] for k in PRICE}
        assert admin.http.put(f"/prices/{MODEL}", json=restored).status_code == 200


@pytest.fixture
def tenant_key(admin: Admin) -> tuple[str, str]:
    tenant = admin.tenant("cache-" + secrets.token_hex(3))
    return tenant, admin.key(tenant)


def client(gateway: Gateway, key: str, **headers: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=gateway.base_url,
        headers={"authorization": f"Bearer {key}", **headers},
        timeout=120,
        limits=httpx.Limits(max_connections=40),
    )


async def test_twenty_identical_requests_share_one_generation_then_hit(
    gateway: Gateway,
    admin: Admin,
    http: httpx.Client,
    tenant_key: tuple[str, str],
    priced: None,
) -> None:
    tenant, key = tenant_key
    body = chat("single flight " + secrets.token_hex(4))
    before = wait_idle(http, MODEL)
    async with client(gateway, key) as api:
        results = await asyncio.gather(
            *(answer(api, {**body, "stream": i % 2 == 1}) for i in range(20))
        )
        middle = wait_idle(http, MODEL)
        # The engine ran one sequence for all twenty.
        assert middle["requests_finished"] - before["requests_finished"] == 1
        texts = {text for text, _, _ in results}
        assert len(texts) == 1
        assert next(iter(texts))
        statuses = sorted(status for _, status, _ in results)
        assert statuses == ["miss"] + ["shared"] * 19
        assert len({rid for _, _, rid in results}) == 20

        # Afterwards the same request is a hit, streamed or not; the engine does nothing.
        hit = await answer(api, body)
        hit_stream = await answer(api, {**body, "stream": True})
        assert [hit[1], hit_stream[1]] == ["hit", "hit"]
        assert hit[0] == hit_stream[0] == next(iter(texts))
        assert engine_stats(http, MODEL)["requests_finished"] == middle["requests_finished"]

        # Cache-Control: no-cache computes afresh; no-store bypasses the cache.
        reply = await api.post(
            "/v1/chat/completions", json=body, headers={"cache-control": "no-cache"}
        )
        assert reply.headers["x-tollgate-cache"] == "miss"
        reply = await api.post(
            "/v1/chat/completions", json=body, headers={"cache-control": "no-store"}
        )
        assert reply.headers["x-tollgate-cache"] == "bypass"
        assert engine_stats(http, MODEL)["requests_finished"] == middle["requests_finished"] + 2

    rows = events_of(admin, tenant, 24)
    assert len(rows) == 24
    assert len({r["id"] for r in rows}) == 24
    by_id = {r["id"]: r for r in rows}
    tiers = sorted(by_id[rid]["cache_tier"] for _, _, rid in [*results, hit, hit_stream])
    assert tiers == ["none"] + ["response"] * 21
    # Every caller got the whole answer and is billed for its own tokens; those served from
    # the response cache pay the response-cache price (the demo's: cached input, free output).
    for r in rows:
        assert r["status"] == "ok"
        assert r["completion_tokens"] == 48
        if r["cache_tier"] == "response":
            assert r["cached_tokens"] == r["prompt_tokens"]
    # Rated at the prices in force: the response-cache ones for hits and shared answers.
    price = Price(
        id=0,
        model=MODEL,
        effective_from=T0,
        **{k: Decimal(v) for k, v in PRICE.items()},
    )
    for r in rows:
        tier = CacheTier(r["cache_tier"])
        expected = rate(price, r["prompt_tokens"], r["cached_tokens"], 48, tier)
        assert Decimal(r["cost_usd"]) == expected, r
    miss = next(r for r in rows if r["cache_tier"] == "none")
    shared = next(r for r in rows if r["cache_tier"] == "response")
    assert Decimal(shared["cost_usd"]) < Decimal(miss["cost_usd"])


async def test_a_tenants_keys_share_answers_and_tenants_never_do(
    gateway: Gateway, admin: Admin, http: httpx.Client
) -> None:
    body = chat("tenant apart " + secrets.token_hex(4))
    tenant = admin.tenant("apart-" + secrets.token_hex(3))
    keys = [admin.key(tenant, "one"), admin.key(tenant, "two")]
    keys.append(admin.key(admin.tenant("apart-" + secrets.token_hex(3))))
    async with (
        client(gateway, keys[0]) as first,
        client(gateway, keys[1]) as sibling,
        client(gateway, keys[2]) as stranger,
    ):
        assert (await answer(first, body))[1] == "miss"
        assert (await answer(first, body))[1] == "hit"
        assert (await answer(sibling, body))[1] == "hit"  # another key of the same tenant
        before = wait_idle(http, MODEL)
        assert (await answer(stranger, body))[1] == "miss"
        assert wait_idle(http, MODEL)["requests_finished"] == before["requests_finished"] + 1


async def test_sampled_requests_bypass_and_seeds_are_part_of_the_key(
    gateway: Gateway, tenant_key: tuple[str, str]
) -> None:
    _, key = tenant_key
    prompt = "seeded " + secrets.token_hex(4)
    async with client(gateway, key) as api:
        sampled = await api.post(
            "/v1/chat/completions", json=chat(prompt, temperature=0.8, max_tokens=4)
        )
        assert sampled.status_code == 200
        assert "x-tollgate-cache" not in sampled.headers
        one = await answer(api, chat(prompt, temperature=0.8, seed=1))
        again = await answer(api, chat(prompt, temperature=0.8, seed=1))
        other = await answer(api, chat(prompt, temperature=0.8, seed=2))
    assert (one[1], again[1], other[1]) == ("miss", "hit", "miss")
    assert one[0] == again[0]


async def test_the_last_follower_leaving_aborts_the_generation(
    gateway: Gateway, http: httpx.Client, tenant_key: tuple[str, str]
) -> None:
    _, key = tenant_key
    body = chat("abandoned " + secrets.token_hex(4), max_tokens=600, stream=True)
    wait_idle(http, MODEL)
    async with client(gateway, key) as api:

        async def leave_after_first_event() -> str:
            async with api.stream("POST", "/v1/chat/completions", json=body) as reply:
                async for line in reply.aiter_lines():
                    if line.startswith("data: {"):
                        return reply.headers["x-tollgate-cache"]
            raise AssertionError("no event")

        async def stay() -> str:
            text, status, _ = await answer(api, body)
            assert text
            return status

        statuses = await asyncio.gather(leave_after_first_event(), stay())
        # The leader left, the follower kept the generation going to its end.
        assert sorted(statuses) == ["miss", "shared"]
        assert (await answer(api, body))[1] == "hit"

        # Everyone gone: the engine stops at once, and nothing is cached.
        body = {**body, "messages": [{"role": "user", "content": "gone " + secrets.token_hex(4)}]}
        await asyncio.gather(leave_after_first_event(), leave_after_first_event())
    idle = wait_idle(http, MODEL, timeout=5)
    assert idle["running"] == 0
    async with client(gateway, key) as api:
        assert (await answer(api, {**body, "max_tokens": 600}))[1] == "miss"
