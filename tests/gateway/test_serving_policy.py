"""The serving policy through the admin API: checked, stored, applied live, nothing dropped."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import httpx
import pytest

from tests.conftest import Gateway, engine_stats, wait_idle
from tests.support.admin import Admin

MODEL = "demo-chat"


def patch(admin: Admin, body: Any) -> httpx.Response:
    return admin.http.patch("/serving", json=body)


def test_the_policy_has_its_defaults_and_refuses_what_is_wrong(admin: Admin, api_key: str) -> None:
    assert patch(admin, {"models": None, "tenants": None, "cache": None}).status_code == 200
    body = admin.http.get("/serving").json()
    assert body["object"] == "serving_policy"
    assert body["cache"]["enabled"] is True
    assert body["models"][MODEL]["slots"] >= 1
    for wrong, param in [
        ({"models": {"no-such-model": {"slots": 2}}}, "no-such-model"),
        ({"queue": {"slots": 0}}, "slots"),
        ({"tenants": {"ten_x": {"weight": 0}}}, "weight"),
        ({"tenants": {"ten_x": {"priority": "urgent"}}}, "priority"),
        ({"cache": {"ttl": 5}}, "ttl"),
        ([1, 2], "object"),
    ]:
        answer = patch(admin, wrong)
        assert answer.status_code == 400, (wrong, answer.text)
        error = answer.json()["error"]
        assert param in f"{error['param']} {error['message']}", answer.text
    with httpx.Client(base_url=admin.http.base_url, timeout=30) as plain:
        tenant_call = plain.get("/serving", headers={"authorization": f"Bearer {api_key}"})
        assert tenant_call.status_code == 403
    assert admin.http.get("/serving").json()["version"] == body["version"]


async def test_changes_apply_live_without_dropping_requests_in_flight(
    gateway: Gateway, admin: Admin, http: httpx.Client, api_key: str
) -> None:
    wait_idle(http, MODEL)
    before = admin.http.get("/serving").json()
    body = {"model": MODEL, "prompt": "in flight", "max_tokens": 1500, "ignore_eos": True}
    async with httpx.AsyncClient(
        base_url=gateway.api_url, headers={"authorization": f"Bearer {api_key}"}, timeout=120
    ) as api:
        running = [asyncio.create_task(api.post("/completions", json=body)) for _ in range(8)]
        await asyncio.sleep(0.5)
        # Fewer slots than requests running, and the cache off, while they run.
        narrowed = patch(admin, {"models": {"demo": {"slots": 2}}, "cache": {"enabled": False}})
        assert narrowed.status_code == 200, narrowed.text
        assert narrowed.json()["models"][MODEL]["slots"] == 2
        assert narrowed.json()["version"] == before["version"] + 1
        late = [asyncio.create_task(api.post("/completions", json=body)) for _ in range(4)]
        await asyncio.sleep(0.5)
        assert engine_stats(http, MODEL)["queued"] == 4  # the late ones wait for a slot
        deterministic = {**body, "temperature": 0, "max_tokens": 4, "prompt": secrets.token_hex(4)}
        bypassed = asyncio.create_task(api.post("/completions", json=deterministic))
        await asyncio.sleep(0.2)
        widened = patch(admin, {"models": None, "cache": None})
        assert widened.status_code == 200
        assert "x-tollgate-cache" not in (await bypassed).headers
        answers = await asyncio.gather(*running, *late)
    assert [a.status_code for a in answers] == [200] * 12
    assert all(a.json()["usage"]["completion_tokens"] == 1500 for a in answers)
    assert max(float(a.headers["x-tollgate-queue-ms"]) for a in answers[8:]) > 0
    after = admin.http.get("/serving").json()
    assert after["models"] == before["models"]
    assert after["cache"] == before["cache"]


def test_a_full_queue_answers_503_with_retry_after(
    gateway: Gateway, admin: Admin, http: httpx.Client, api_key: str
) -> None:
    narrowed = patch(admin, {"models": {MODEL: {"slots": 1, "max_queued": 0}}})
    assert narrowed.status_code == 200
    try:
        wait_idle(http, MODEL)
        body = {"model": MODEL, "prompt": "one at a time", "max_tokens": 1500, "ignore_eos": True}
        with (
            httpx.Client(
                base_url=gateway.api_url, headers={"authorization": f"Bearer {api_key}"}, timeout=60
            ) as api,
            api.stream("POST", "/completions", json={**body, "stream": True}) as first,
        ):
            assert first.status_code == 200
            lines = first.iter_lines()  # kept: closing it would close the stream
            next(lines)
            assert engine_stats(http, MODEL)["admitted"] == 1
            refused = api.post("/completions", json=body)
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"]["code"] == "model_overloaded"
            assert int(refused.headers["retry-after"]) >= 1
    finally:
        assert patch(admin, {"models": None}).status_code == 200


@pytest.mark.parametrize("isolated", [False, True])
async def test_isolated_tenants_do_not_share_cached_prefixes(
    gateway: Gateway, admin: Admin, isolated: bool
) -> None:
    tenants = [admin.tenant(f"prefix-{isolated}-" + secrets.token_hex(3)) for _ in range(2)]
    keys = [admin.key(t) for t in tenants]
    if isolated:
        shares = {t: {"isolate_prefix": True} for t in tenants}
        assert patch(admin, {"tenants": shares}).status_code == 200
    preamble = f"a long shared preamble {secrets.token_hex(4)} " * 30
    cached = []
    try:
        for key in keys:
            async with httpx.AsyncClient(
                base_url=gateway.api_url, headers={"authorization": f"Bearer {key}"}, timeout=60
            ) as api:
                reply = await api.post(
                    "/completions",
                    json={"model": MODEL, "prompt": preamble, "max_tokens": 1, "temperature": 0.5},
                )
                usage = reply.json()["usage"]
                cached.append(usage["prompt_tokens_details"]["cached_tokens"])
    finally:
        if isolated:
            assert patch(admin, {"tenants": {t: None for t in tenants}}).status_code == 200
    # The second tenant reuses the first's prefix only when they are not isolated.
    assert cached[0] == 0
    assert (cached[1] == 0) is isolated, cached
