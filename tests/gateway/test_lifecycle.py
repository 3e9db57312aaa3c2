"""Every model call settles and is billed exactly once, however its client leaves.

Clients here are plain sockets that close at a chosen point: right after sending, a few
milliseconds later (before the first token), after the response headers, mid-stream, and
right after the last byte. Afterwards the tenant's concurrency slots are free, every
admitted request has one usage event, and the server logged no error.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from decimal import Decimal

import httpx
import pytest

from billing.pricing import to_nano_usd
from gateway.quotas import RedisQuotaStore
from tests.conftest import Deployment, Gateway
from tests.support.admin import Admin
from tests.support.raw import close_after, send_then_close
from tests.support.waits import events_of, settled

STREAM = {
    "model": "demo-chat",
    "prompt": "a client that leaves early",
    "max_tokens": 400,
    "ignore_eos": True,
    "stream": True,
}


@pytest.fixture
async def store(deployment: Deployment) -> AsyncIterator[RedisQuotaStore]:
    quota_store = RedisQuotaStore.from_url(deployment.redis.url, timeout_s=2)
    yield quota_store
    await quota_store.close()


def new_errors(gateway: Gateway, since: int) -> str:
    """What the gateway logged as errors since ``since`` characters into its log."""
    lines = gateway.log()[since:].splitlines()
    return "\n".join(
        line for line in lines if " ERROR " in line or "Traceback" in line or "RuntimeError" in line
    )


async def test_streams_abandoned_at_any_moment_free_their_slots_and_bill_once(
    gateway: Gateway, admin: Admin, store: RedisQuotaStore
) -> None:
    tenant = admin.tenant("leaves-early", max_concurrency=2, rpm=100_000)
    key = admin.key(tenant)
    log_at = len(gateway.log())
    delays = [0, 0, 0, 0.001, 0.002, 0.004, 0.006, 0.008, 0.012, 0.016, 0.025, 0.05]
    for delay in delays:
        await asyncio.to_thread(
            send_then_close, gateway.base_url, "/v1/completions", STREAM, key, delay
        )
    await asyncio.sleep(1.0)  # the server has seen every client leave
    await settled(store, tenant, f"tenant:{tenant}")
    async with httpx.AsyncClient(
        base_url=gateway.api_url, headers={"authorization": f"Bearer {key}"}, timeout=60
    ) as http:
        for _ in range(4):
            answer = await http.post(
                "/completions", json={"model": "demo-chat", "prompt": "next", "max_tokens": 2}
            )
            assert answer.status_code == 200, answer.text
    final = await settled(store, tenant, f"tenant:{tenant}")
    admitted = final.requests_in_window - 4
    # Some were admitted and abandoned before (or just after) their first token.
    assert admitted >= 2
    rows = events_of(admin, tenant, admitted + 4)
    await asyncio.sleep(1.0)  # nothing arrives late or twice
    rows = events_of(admin, tenant, admitted + 4)
    assert len({r["id"] for r in rows}) == len(rows)
    statuses = [r["status"] for r in rows]
    assert statuses.count("ok") == 4
    # Each admitted request has its event; refusals (the two slots were taken) have one too.
    assert statuses.count("aborted") == admitted
    assert set(statuses) <= {"ok", "aborted", "rejected"}
    for row in rows:
        if row["status"] == "aborted":
            assert row["completion_tokens"] < 400
    assert final.tokens_in_window == sum(r["prompt_tokens"] + r["completion_tokens"] for r in rows)
    assert new_errors(gateway, log_at) == ""


async def test_multi_prompt_stream_cut_after_its_first_events(
    gateway: Gateway, admin: Admin, store: RedisQuotaStore
) -> None:
    tenant = admin.tenant("multi-prompt-cut", max_concurrency=4)
    key = admin.key(tenant)
    log_at = len(gateway.log())
    body = {**STREAM, "prompt": ["a b c", "d e f", "g h i"], "n": 2}
    seen = await asyncio.to_thread(
        close_after, gateway.base_url, "/v1/completions", body, key, b'"index":5'
    )
    assert b" 200 OK" in seen
    (row,) = events_of(admin, tenant, 1)
    assert row["status"] == "aborted"
    assert row["prompt_tokens"] > 0
    assert 0 < row["completion_tokens"] < 3 * 2 * 400
    usage = await settled(store, tenant, f"tenant:{tenant}")
    assert usage.tokens_in_window == row["prompt_tokens"] + row["completion_tokens"]
    assert new_errors(gateway, log_at) == ""


async def test_closed_after_the_headers_and_after_the_last_byte(
    gateway: Gateway, admin: Admin, store: RedisQuotaStore
) -> None:
    tenant = admin.tenant("headers-and-last-byte")
    key = admin.key(tenant)
    after_headers = await asyncio.to_thread(
        close_after, gateway.base_url, "/v1/completions", STREAM, key, b"\r\n\r\n"
    )
    complete = {**STREAM, "max_tokens": 5, "stream_options": {"include_usage": True}}
    after_last = await asyncio.to_thread(
        close_after, gateway.base_url, "/v1/completions", complete, key, b"data: [DONE]"
    )
    assert b"[DONE]" in after_last
    ids = {
        raw.split(b"x-request-id: ")[1].split(b"\r\n")[0].decode()
        for raw in (after_headers, after_last)
    }
    rows = {r["id"]: r for r in events_of(admin, tenant, 2)}
    assert set(rows) == ids
    statuses = sorted(r["status"] for r in rows.values())
    assert statuses == ["aborted", "ok"]
    ok = next(r for r in rows.values() if r["status"] == "ok")
    assert ok["completion_tokens"] == 5
    # The receipt in the last chunk is the event's cost.
    receipt = after_last.split(b'"cost_usd":"')[1].split(b'"')[0].decode()
    assert Decimal(receipt) == Decimal(ok["cost_usd"])


async def test_embeddings_share_the_lifecycle(
    gateway: Gateway, admin: Admin, store: RedisQuotaStore
) -> None:
    tenant = admin.tenant("embeddings-lifecycle", max_concurrency=1, rpm=1000)
    key = admin.key(tenant)
    async with httpx.AsyncClient(
        base_url=gateway.api_url, headers={"authorization": f"Bearer {key}"}, timeout=60
    ) as http:
        answer = await http.post("/embeddings", json={"model": "minilm", "input": ["one", "two"]})
        assert answer.status_code == 200, answer.text
        tokens = answer.json()["usage"]["prompt_tokens"]
        refused = await http.post(
            "/embeddings", json={"model": "minilm", "input": "x", "dimensions": 12}
        )
        assert refused.status_code == 400
        assert refused.json()["error"]["param"] == "dimensions"
    rows = {r["id"]: r for r in events_of(admin, tenant, 2)}
    ok = rows[answer.headers["x-request-id"]]
    assert (ok["status"], ok["operation"], ok["prompt_tokens"]) == ("ok", "embeddings", tokens)
    assert rows[refused.headers["x-request-id"]]["status"] == "error"
    usage = await settled(store, tenant, f"tenant:{tenant}")
    assert usage.tokens_in_window == tokens


async def test_spend_settles_to_the_invoice_to_the_nano_dollar(
    gateway: Gateway, admin: Admin, store: RedisQuotaStore
) -> None:
    before = [p for p in admin.http.get("/prices").json()["data"] if p["model"] == "demo-chat"]
    price = {"input_per_mtok": "3.000001", "cached_input_per_mtok": "0.3", "output_per_mtok": "7"}
    assert admin.http.put("/prices/demo-chat", json=price).status_code == 200
    try:
        await _spend_against_invoice(gateway, admin, store, price)
    finally:  # later tests find the price they expect
        if before:
            latest = max(before, key=lambda p: p["effective_from"])
            restored = {k: latest[k] for k in price}
            assert admin.http.put("/prices/demo-chat", json=restored).status_code == 200


async def _spend_against_invoice(
    gateway: Gateway, admin: Admin, store: RedisQuotaStore, price: dict[str, str]
) -> None:
    tenant = admin.tenant("spend-equals-invoice", monthly_spend_usd="1000")
    key = admin.key(tenant)
    prefix = "a shared preamble that the prefix cache keeps " * 40
    cached = 0
    async with httpx.AsyncClient(
        base_url=gateway.api_url, headers={"authorization": f"Bearer {key}"}, timeout=60
    ) as http:
        for i in range(6):
            answer = await http.post(
                "/completions",
                json={"model": "demo-chat", "prompt": prefix + str(i), "max_tokens": 3 + i},
            )
            assert answer.status_code == 200, answer.text
            usage = answer.json()["usage"]
            cached += usage["prompt_tokens_details"]["cached_tokens"]
            # The shared preamble is in the prefix cache from the second request on.
            assert (usage["prompt_tokens_details"]["cached_tokens"] > 0) == (i > 0), (i, usage)
            expected = (
                Decimal(price["input_per_mtok"])
                * (usage["prompt_tokens"] - usage["prompt_tokens_details"]["cached_tokens"])
                + Decimal(price["cached_input_per_mtok"])
                * usage["prompt_tokens_details"]["cached_tokens"]
                + Decimal(price["output_per_mtok"]) * usage["completion_tokens"]
            ) / 10**6
            assert Decimal(answer.headers["x-tollgate-cost-usd"]) == expected
    assert cached > 0, "the prefix cache served nothing: this test would prove nothing"
    rows = events_of(admin, tenant, 6)
    usage_now = await settled(store, tenant, f"tenant:{tenant}")
    # Cached tokens at the cached price: the counter is the sum of the events' costs.
    assert usage_now.monthly_spend_nusd == sum(to_nano_usd(Decimal(r["cost_usd"])) for r in rows)
    period = rows[0]["occurred_at"][:7]
    invoice = admin.http.get("/billing/invoices", params={"tenant": tenant, "period": period})
    total = sum(Decimal(r["cost_usd"]) for r in rows)
    assert Decimal(invoice.json()["total_usd"]) == total.quantize(Decimal("0.01"))
