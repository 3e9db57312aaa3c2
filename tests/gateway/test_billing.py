"""Billing through the real gateway: prices, receipts, one event per request, exports and
invoices read back with the tools finance uses."""

from __future__ import annotations

import csv
import io
import time
from datetime import datetime
from decimal import Decimal
from typing import Any

import httpx
import openai
import pyarrow.parquet as pq
import pytest

from billing.pricing import Price, rate
from tests.conftest import Gateway
from tests.support.admin import Admin
from tests.support.focus import FOCUS_NAMED_COLUMNS
from tests.support.waits import events_of

CHAT = {"model": "demo-chat", "messages": [{"role": "user", "content": "count to three"}]}
PRICE = {"input_per_mtok": "1.25", "cached_input_per_mtok": "0.125", "output_per_mtok": "10.00"}


@pytest.fixture(scope="module")
def priced(admin: Admin) -> Price:
    """demo-chat has a price from now on (the same for every test of this module)."""
    answer = admin.http.put("/prices/demo-chat", json=PRICE)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    return Price(
        id=body["id"],
        model="demo-chat",
        input_per_mtok=Decimal(body["input_per_mtok"]),
        cached_input_per_mtok=Decimal(body["cached_input_per_mtok"]),
        output_per_mtok=Decimal(body["output_per_mtok"]),
        effective_from=datetime.fromisoformat(body["effective_from"]),
    )


def test_prices_are_the_operators(gateway: Gateway, admin: Admin, priced: Price) -> None:
    listed = admin.http.get("/prices").json()["data"]
    assert any(p["id"] == priced.id and p["output_per_mtok"] == "10.000000" for p in listed)
    tenant = admin.tenant("price-setter")
    tenant_admin = admin.issue(tenant, "owner", role="admin")
    with httpx.Client(
        base_url=gateway.base_url + "/admin/v1",
        headers={"authorization": f"Bearer {tenant_admin.value}"},
    ) as http:
        assert http.put("/prices/demo-chat", json=PRICE).status_code == 403
        assert http.get("/prices").status_code == 200
    for bad in ("-1", "0.0000001", "lots"):
        answer = admin.http.put("/prices/demo-chat", json={"input_per_mtok": bad})
        assert answer.status_code == 400, bad
        assert answer.json()["error"]["param"] == "input_per_mtok"
    assert admin.http.put("/prices/no-such-model", json=PRICE).status_code == 400


def test_receipts_and_one_event_per_request(gateway: Gateway, admin: Admin, priced: Price) -> None:
    tenant = admin.tenant("receipts")
    key = admin.key(tenant)
    ids: dict[str, dict[str, Any]] = {}
    with openai.OpenAI(base_url=gateway.api_url, api_key=key, max_retries=0) as client:
        raw = client.chat.completions.with_raw_response.create(**CHAT, max_tokens=12)
        reply = raw.parse()
        cost = Decimal(raw.headers["x-tollgate-cost-usd"])
        usage = reply.usage
        assert usage is not None
        expected = rate(
            priced,
            usage.prompt_tokens,
            usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0,
            usage.completion_tokens,
        )
        assert cost == expected
        assert cost > 0
        ids[raw.headers["x-request-id"]] = {"cost": cost, "completion": usage.completion_tokens}

        stream = client.chat.completions.with_raw_response.create(
            **CHAT, max_tokens=8, stream=True, stream_options={"include_usage": True}
        )
        chunks = list(stream.parse())
        final = chunks[-1].usage
        assert final is not None
        streamed_cost = Decimal(final.model_extra["cost_usd"])  # type: ignore[index]
        ids[stream.headers["x-request-id"]] = {
            "cost": streamed_cost,
            "completion": final.completion_tokens,
        }
    rows = events_of(admin, tenant, 2)
    assert {r["id"] for r in rows} == set(ids)
    for row in rows:
        assert Decimal(row["cost_usd"]) == ids[row["id"]]["cost"]
        assert row["completion_tokens"] == ids[row["id"]]["completion"]
        assert row["status"] == "ok"
        assert row["price_id"] == priced.id


def test_mid_stream_disconnect_is_one_aborted_event(admin: Admin, gateway: Gateway) -> None:
    tenant = admin.tenant("abandoned")
    key = admin.key(tenant)
    body = {**CHAT, "max_tokens": 1500, "stream": True, "ignore_eos": True}
    deltas = 0
    with (
        httpx.Client(
            base_url=gateway.api_url, headers={"authorization": f"Bearer {key}"}, timeout=60
        ) as http,
        http.stream("POST", "/chat/completions", json=body) as response,
    ):
        request_id = response.headers["x-request-id"]
        lines = response.iter_lines()
        for line in lines:
            deltas += '"content":"' in line and '"content":""' not in line
            if deltas >= 25:
                break
    (row,) = events_of(admin, tenant, 1)
    time.sleep(1.0)  # nothing more arrives for it
    assert len(events_of(admin, tenant, 1)) == 1
    assert row["id"] == request_id
    assert row["status"] == "aborted"
    assert 25 <= row["completion_tokens"] < 1500  # what the engine made before the abort


def test_refused_requests_are_rejected_events(admin: Admin, gateway: Gateway) -> None:
    tenant = admin.tenant("refused", rpm=1)
    key = admin.key(tenant)
    with httpx.Client(
        base_url=gateway.api_url, headers={"authorization": f"Bearer {key}"}, timeout=60
    ) as http:
        first = http.post("/chat/completions", json={**CHAT, "max_tokens": 2})
        second = http.post("/chat/completions", json={**CHAT, "max_tokens": 2})
    assert (first.status_code, second.status_code) == (200, 429)
    rows = {r["id"]: r for r in events_of(admin, tenant, 2)}
    assert rows[second.headers["x-request-id"]]["status"] == "rejected"
    assert Decimal(rows[second.headers["x-request-id"]]["cost_usd"]) == 0
    assert rows[first.headers["x-request-id"]]["status"] == "ok"


def test_monthly_spend_quota_uses_real_prices(
    admin: Admin, gateway: Gateway, priced: Price
) -> None:
    # 40 output tokens cost 40 * 10 / 1e6 = 0.0004 USD: a budget of 0.001 allows two.
    tenant = admin.tenant("spender", monthly_spend_usd="0.001")
    key = admin.key(tenant)
    codes = []
    with httpx.Client(
        base_url=gateway.api_url, headers={"authorization": f"Bearer {key}"}, timeout=60
    ) as http:
        for _ in range(4):
            answer = http.post(
                "/completions",
                json={"model": "demo-chat", "prompt": "hi", "max_tokens": 40, "ignore_eos": True},
            )
            codes.append(answer.status_code)
            if answer.status_code == 429:
                assert answer.json()["error"]["code"] == "insufficient_quota"
    assert codes == [200, 200, 429, 429]


def test_exports_and_invoice_agree_with_the_ledger(
    admin: Admin, gateway: Gateway, priced: Price
) -> None:
    tenant = admin.tenant("finance")
    key = admin.key(tenant)
    with openai.OpenAI(base_url=gateway.api_url, api_key=key, max_retries=0) as client:
        for i in range(5):
            client.completions.create(model="demo-chat", prompt=f"line {i}", max_tokens=5 + i)
    rows = events_of(admin, tenant, 5)
    total = sum(Decimal(r["cost_usd"]) for r in rows)
    assert total > 0
    params = {"tenant": tenant, "start": "2000-01-01"}

    as_csv = admin.http.get("/billing/export", params={**params, "format": "csv"})
    assert as_csv.headers["content-type"].startswith("text/csv")
    table = list(csv.DictReader(io.StringIO(as_csv.text)))
    assert len(table) == 5
    assert sum(Decimal(r["cost_usd"]) for r in table) == total

    as_parquet = admin.http.get("/billing/export", params={**params, "format": "parquet"})
    parquet = pq.read_table(io.BytesIO(as_parquet.content))
    assert parquet.num_rows == 5
    assert sum(Decimal(str(v)) for v in parquet.column("cost_usd").to_pylist()) == total

    as_focus = admin.http.get("/billing/export", params={**params, "format": "focus"})
    focus = list(csv.DictReader(io.StringIO(as_focus.text)))
    assert set(FOCUS_NAMED_COLUMNS) <= set(focus[0])
    assert sum(Decimal(r["BilledCost"]) for r in focus) == total
    assert {r["SubAccountId"] for r in focus} == {tenant}
    assert {r["SubAccountName"] for r in focus} == {"finance"}

    period = rows[0]["occurred_at"][:7]
    invoice = admin.http.get(
        "/billing/invoices", params={"tenant": tenant, "period": period}
    ).json()
    assert Decimal(invoice["total_usd"]) == total.quantize(Decimal("0.01"))
    assert sum(Decimal(line["amount_usd"]) for line in invoice["lines"]) == Decimal(
        invoice["total_usd"]
    )
    usage = admin.http.get(
        "/usage", params={"tenant": tenant, "start": period + "-01", "group_by": "model"}
    ).json()["data"]
    assert sum(Decimal(str(u["cost_usd"])) for u in usage) == total
