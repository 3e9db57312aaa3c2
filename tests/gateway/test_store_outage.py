"""Redis down or hung mid-run: no hang, budgets fail closed, rate limits fail open, and
nothing reserved is lost or counted twice once it returns."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from gateway.quotas import RedisQuotaStore
from tests.conftest import Collector, Deployment, Gateway
from tests.support.admin import Admin
from tests.support.waits import events_of, settled

BODY = {"model": "demo-chat", "prompt": "hello there", "max_tokens": 4}


@pytest.fixture
def redis_back(deployment: Deployment) -> Iterator[None]:
    """Whatever a test does to Redis, it is running again afterwards."""
    yield
    deployment.redis.resume()
    deployment.redis.start()


@pytest.fixture
async def store(deployment: Deployment) -> AsyncIterator[RedisQuotaStore]:
    quota_store = RedisQuotaStore.from_url(deployment.redis.url, timeout_s=2)
    yield quota_store
    await quota_store.close()


def timed_post(http: httpx.Client, key: str) -> tuple[httpx.Response, float]:
    began = time.perf_counter()
    response = http.post("/completions", json=BODY, headers={"authorization": f"Bearer {key}"})
    return response, time.perf_counter() - began


@pytest.mark.parametrize("outage", ["stopped", "hung"])
async def test_outage_fails_budgets_closed_and_rates_open(
    outage: str,
    gateway: Gateway,
    otlp_collector: Collector,
    admin: Admin,
    deployment: Deployment,
    store: RedisQuotaStore,
    redis_back: None,
) -> None:
    budget_tenant = admin.tenant(f"budget-{outage}", daily_tokens=100_000)
    budget_key = admin.key(budget_tenant)
    rate_tenant = admin.tenant(f"rate-{outage}", rpm=1_000)
    rate_key = admin.key(rate_tenant)
    with httpx.Client(base_url=gateway.api_url, timeout=30) as http:
        answered: set[str] = set()
        for key in (budget_key, rate_key):  # keys cached, connections warm
            assert timed_post(http, key)[0].status_code == 200
        if outage == "stopped":
            deployment.redis.stop()
        else:
            deployment.redis.pause()
        for _ in range(3):
            closed, closed_s = timed_post(http, budget_key)
            assert closed.status_code == 503, closed.text
            assert closed.json()["error"]["code"] == "quota_store_unavailable"
            assert closed.headers["retry-after"]
            assert closed_s < 0.5, f"admission took {closed_s:.3f} s with Redis {outage}"
            opened, opened_s = timed_post(http, rate_key)
            assert opened.status_code == 200, opened.text
            assert opened_s < 0.5, f"an answer took {opened_s:.3f} s with Redis {outage}"
            answered.add(opened.headers["x-request-id"])
        if outage == "stopped":
            deployment.redis.start()
        else:
            deployment.redis.resume()
        deadline = time.monotonic() + 15
        while timed_post(http, budget_key)[0].status_code != 200:
            assert time.monotonic() < deadline, "no recovery after Redis came back"
            await asyncio.sleep(0.2)
    # Refused admissions whose fate was unknown were released; nothing is left reserved.
    budget = await settled(store, budget_tenant, f"tenant:{budget_tenant}")
    assert budget.open_reservations == 0
    assert budget.daily_tokens <= 2 * (len("hello there") + 4 + 16)  # the two answered calls
    # Answers given while Redis was away still have their usage events (the SQL fallback);
    # the one answered before may wait on the outbox's claim-idle time (30 s) when another
    # replica of the deployment was handed it as Redis went away.
    ids = {row["id"] for row in events_of(admin, rate_tenant, len(answered) + 1, timeout=45)}
    assert answered <= ids
    # Both outcomes are counted.
    deadline = time.monotonic() + 10
    while not all(
        any(outcome in body for body in otlp_collector.bodies("metrics"))
        for outcome in (b"store_down_closed", b"store_down_open")
    ):
        assert time.monotonic() < deadline, "outage outcomes missing from the metrics"
        await asyncio.sleep(0.2)


async def test_settlement_survives_a_restart_mid_stream(
    gateway: Gateway,
    admin: Admin,
    deployment: Deployment,
    store: RedisQuotaStore,
    redis_back: None,
) -> None:
    tenant = admin.tenant("mid-stream-outage", daily_tokens=1_000_000)
    key = admin.key(tenant)
    async with httpx.AsyncClient(
        base_url=gateway.api_url, headers={"authorization": f"Bearer {key}"}, timeout=120
    ) as http:
        body = {
            **BODY,
            "max_tokens": 300,
            "stream": True,
            "ignore_eos": True,
            "stream_options": {"include_usage": True},
        }
        usage = None
        async with http.stream("POST", "/completions", json=body) as response:
            assert response.status_code == 200
            lines = response.aiter_lines()
            async for line in lines:
                if line.startswith("data: {") and usage is None:
                    deployment.redis.stop()  # Redis goes away while the answer streams
                    usage = {}
                if '"usage":{' in line:
                    usage = json.loads(line[6:])["usage"]
        assert usage
        assert usage["completion_tokens"] == 300
        await asyncio.sleep(1.0)  # the settlement fails and waits
        deployment.redis.start()
    state = await settled(store, tenant, f"tenant:{tenant}")
    assert state.daily_tokens == usage["total_tokens"]  # applied once, to the real usage
