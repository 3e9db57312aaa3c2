"""Keys and quotas through the real gateway, its Redis store and its PostgreSQL accounts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import httpx
import openai
import pytest

from gateway.quotas import RedisQuotaStore
from tests.conftest import Deployment, Gateway
from tests.support.admin import Admin
from tests.support.waits import settled

CHAT = {"model": "demo-chat", "messages": [{"role": "user", "content": "count to three"}]}


def sdk(gateway: Gateway, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.api_url, api_key=key, max_retries=0, timeout=60)


@pytest.fixture
async def store(deployment: Deployment) -> AsyncIterator[RedisQuotaStore]:
    quota_store = RedisQuotaStore.from_url(deployment.redis.url, timeout_s=2)
    yield quota_store
    await quota_store.close()


def test_requests_need_a_valid_key(gateway: Gateway) -> None:
    with httpx.Client(base_url=gateway.api_url, timeout=30) as http:
        missing = http.post("/chat/completions", json=CHAT)
        assert missing.status_code == 401
        assert missing.json()["error"]["code"] == "invalid_api_key"
        assert missing.headers["x-request-id"]
        bad = "tg_" + "A" * 36
        malformed = http.post("/chat/completions", json=CHAT, headers={"authorization": bad})
        assert malformed.status_code == 401
    for key in ("tg_notakey", "tg_" + "x" * 36, "sk-" + "1" * 48):
        with sdk(gateway, key) as c, pytest.raises(openai.AuthenticationError) as err:
            c.chat.completions.create(**CHAT, max_tokens=2)
        assert key not in err.value.response.text


def test_health_needs_no_key(gateway: Gateway) -> None:
    assert httpx.get(gateway.base_url + "/healthz").status_code == 200
    assert httpx.get(gateway.base_url + "/readyz").status_code == 200


def test_key_limited_to_models(gateway: Gateway, admin: Admin) -> None:
    tenant = admin.tenant("models-limited")
    key = admin.key(tenant, "chat-only", models=["demo"])
    with sdk(gateway, key) as c:
        # The model, and with it its adapters.
        assert [m.id for m in c.models.list()] == ["demo-chat", "demo-chat:sample"]
        assert c.chat.completions.create(**CHAT, max_tokens=2).choices
        with pytest.raises(openai.PermissionDeniedError) as err:
            c.embeddings.create(model="minilm", input="hi")
        assert err.value.code == "model_not_allowed"
        with pytest.raises(openai.NotFoundError):
            c.models.retrieve("minilm")


def test_revoked_key_stops_within_two_seconds(gateway: Gateway, admin: Admin) -> None:
    tenant = admin.tenant("revoked")
    issued = admin.issue(tenant, "soon-revoked")
    with sdk(gateway, issued.value) as c:
        c.models.list()  # cached as valid now
        assert admin.http.delete(f"/keys/{issued.id}").status_code == 200
        revoked_at = time.monotonic()
        while True:
            try:
                c.models.list()
            except openai.AuthenticationError:
                break
            assert time.monotonic() - revoked_at < 2.0, "revoked key still accepted after 2 s"
            time.sleep(0.05)


def test_expired_key_is_refused(gateway: Gateway, admin: Admin) -> None:
    tenant = admin.tenant("expiring")
    soon = datetime.now(UTC) + timedelta(seconds=2)
    key = admin.key(tenant, "short-lived", expires_at=soon.isoformat())
    with sdk(gateway, key) as c:
        c.models.list()
        time.sleep(max((soon - datetime.now(UTC)).total_seconds(), 0) + 0.1)
        with pytest.raises(openai.AuthenticationError):
            c.models.list()


def test_rpm_limit_answers_429_with_openai_headers(gateway: Gateway, admin: Admin) -> None:
    tenant = admin.tenant("rpm-three", rpm=3, tpm=100_000)
    key = admin.key(tenant)
    with httpx.Client(
        base_url=gateway.api_url, headers={"authorization": f"Bearer {key}"}, timeout=60
    ) as http:
        remaining = []
        for _ in range(3):
            ok = http.post("/chat/completions", json={**CHAT, "max_tokens": 2})
            assert ok.status_code == 200, ok.text
            assert ok.headers["x-ratelimit-limit-requests"] == "3"
            assert ok.headers["x-ratelimit-limit-tokens"] == "100000"
            assert ok.headers["x-ratelimit-reset-requests"].endswith("s")
            remaining.append(int(ok.headers["x-ratelimit-remaining-requests"]))
            assert int(ok.headers["x-ratelimit-remaining-tokens"]) < 100_000
        assert remaining == [2, 1, 0]
        refused = http.post("/chat/completions", json={**CHAT, "max_tokens": 2})
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    with sdk(gateway, key) as c, pytest.raises(openai.RateLimitError):
        c.chat.completions.create(**CHAT, max_tokens=2)


def test_monthly_budget_answers_insufficient_quota(gateway: Gateway, admin: Admin) -> None:
    tenant = admin.tenant("tiny-budget", monthly_tokens=10)
    with sdk(gateway, admin.key(tenant)) as c, pytest.raises(openai.RateLimitError) as err:
        c.chat.completions.create(**CHAT, max_tokens=50)
    assert err.value.code == "insufficient_quota"
    assert int(err.value.response.headers["retry-after"]) > 0


async def test_token_budget_holds_under_200_concurrent_requests(
    gateway: Gateway, admin: Admin, store: RedisQuotaStore
) -> None:
    budget = 3_000
    tenant = admin.tenant("token-budget", daily_tokens=budget)
    key = admin.key(tenant)
    async with httpx.AsyncClient(
        base_url=gateway.api_url,
        headers={"authorization": f"Bearer {key}"},
        timeout=120,
        limits=httpx.Limits(max_connections=200),
    ) as http:

        async def one() -> httpx.Response:
            return await http.post(
                "/completions",
                json={"model": "demo-chat", "prompt": "one two three", "max_tokens": 40},
            )

        answers = await asyncio.gather(*(one() for _ in range(200)))
    ok = [a for a in answers if a.status_code == 200]
    refused = [a for a in answers if a.status_code == 429]
    assert len(ok) + len(refused) == 200, {a.status_code for a in answers}
    assert ok
    assert refused
    assert all(a.json()["error"]["code"] == "insufficient_quota" for a in refused)
    used = sum(a.json()["usage"]["total_tokens"] for a in ok)
    assert used <= budget
    usage = await settled(store, tenant, f"tenant:{tenant}")
    assert usage.daily_tokens == used  # reservations settled to exactly what was used
    assert usage.open_reservations == 0


async def test_disconnect_mid_stream_settles_to_what_was_generated(
    gateway: Gateway, admin: Admin, store: RedisQuotaStore
) -> None:
    tenant = admin.tenant("disconnects", daily_tokens=1_000_000, max_concurrency=2)
    key = admin.key(tenant)
    async with httpx.AsyncClient(
        base_url=gateway.api_url, headers={"authorization": f"Bearer {key}"}, timeout=60
    ) as http:
        body = {**CHAT, "max_tokens": 1500, "stream": True, "ignore_eos": True}
        async with http.stream("POST", "/chat/completions", json=body) as response:
            assert response.status_code == 200
            lines = response.aiter_lines()
            events = 0
            async for line in lines:
                events += line.startswith("data: ")
                if events >= 20:
                    during = await store.usage(tenant, f"tenant:{tenant}")
                    break
    assert during.in_flight == 1
    assert during.daily_tokens > 1500  # the reservation: prompt plus max_tokens
    usage = await settled(store, tenant, f"tenant:{tenant}")
    # Reserved: prompt + 1500; settled: prompt + the tokens made before the abort.
    assert usage.daily_tokens < during.daily_tokens
    assert 19 <= usage.daily_tokens < 1500
    assert usage.in_flight == 0


def test_admin_token_cannot_call_models(gateway: Gateway, deployment: Deployment) -> None:
    with sdk(gateway, deployment.admin_token) as c, pytest.raises(openai.PermissionDeniedError):
        c.chat.completions.create(**CHAT, max_tokens=2)
