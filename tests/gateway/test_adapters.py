"""LoRA adapters on the shared gateway: the demo adapter (``demo-chat:sample``) on demo-chat's
engine, its bill, and adapters registered through the admin API."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

import httpx
import openai
import pytest

from billing.pricing import Price, rate
from tests.conftest import Gateway
from tests.support.admin import Admin
from tests.support.waits import events_of

BASE_PRICE = {"input_per_mtok": "2.00", "cached_input_per_mtok": "0.20", "output_per_mtok": "8.00"}


def ask(client: openai.OpenAI, model: str, seed: int = 11) -> Any:
    return client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Tell me about the sea."}],
        max_tokens=16,
        temperature=0.9,
        seed=seed,
        extra_headers={"cache-control": "no-store"},
    )


def test_the_demo_adapter_is_listed(client: openai.OpenAI) -> None:
    assert "demo-chat:sample" in {m.id for m in client.models.list()}
    assert client.models.retrieve("demo-chat:sample").id == "demo-chat:sample"
    assert client.models.retrieve("demo:sample").id == "demo-chat:sample"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("demo-chat:nothing")


def test_the_adapter_answers_differently_from_the_base_under_the_same_seed(
    client: openai.OpenAI,
) -> None:
    base = ask(client, "demo-chat")
    adapted = ask(client, "demo-chat:sample")
    again = ask(client, "demo-chat:sample")
    assert adapted.model == "demo-chat:sample"
    assert base.model == "demo-chat"
    assert adapted.choices[0].message.content != base.choices[0].message.content
    # The same seed on the same adapter: the same answer.
    assert again.choices[0].message.content == adapted.choices[0].message.content


def test_the_adapter_is_billed_under_its_own_name_at_the_base_price(
    gateway: Gateway, admin: Admin
) -> None:
    answer = admin.http.put("/prices/demo-chat", json=BASE_PRICE)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    price = Price(
        id=body["id"],
        model="demo-chat",
        input_per_mtok=Decimal(BASE_PRICE["input_per_mtok"]),
        cached_input_per_mtok=Decimal(BASE_PRICE["cached_input_per_mtok"]),
        output_per_mtok=Decimal(BASE_PRICE["output_per_mtok"]),
        effective_from=datetime.fromisoformat(body["effective_from"]),
    )
    tenant = admin.tenant("adapter-billing")
    key = admin.key(tenant)
    with openai.OpenAI(base_url=gateway.api_url, api_key=key, max_retries=0) as tenant_client:
        raw = tenant_client.chat.completions.with_raw_response.create(
            model="demo-chat:sample",
            messages=[{"role": "user", "content": "Bill me."}],
            max_tokens=8,
            temperature=0.9,
        )
    answer_usage = raw.parse().usage
    assert answer_usage is not None
    [event] = events_of(admin, tenant, 1)
    assert event["model"] == "demo-chat:sample"
    expected = rate(
        price,
        answer_usage.prompt_tokens,
        answer_usage.prompt_tokens_details.cached_tokens
        if answer_usage.prompt_tokens_details
        else 0,
        answer_usage.completion_tokens,
    )
    assert Decimal(event["cost_usd"]) == expected
    assert Decimal(raw.headers["x-tollgate-cost-usd"]) == expected
    assert expected > 0


def test_adapters_are_registered_and_removed_live(
    gateway: Gateway, admin: Admin, client: openai.OpenAI
) -> None:
    path = "/models/demo-chat/adapters/second"
    answer = admin.http.put(path, json={"source": "/nowhere/adapter"})
    assert answer.status_code == 400, answer.text
    assert "/nowhere/adapter" in answer.json()["error"]["message"]
    answer = admin.http.put(path, json={"source": "{data_dir}/models/demo-chat-sample-lora"})
    assert answer.status_code == 201, answer.text
    assert answer.json()["id"] == "demo-chat:second"
    try:
        # The same weights under another name: the same answer as the demo adapter's.
        second = ask(client, "demo-chat:second")
        assert second.model == "demo-chat:second"
        assert (
            second.choices[0].message.content
            == ask(client, "demo-chat:sample").choices[0].message.content
        )
        assert "demo-chat:second" in {m.id for m in client.models.list()}
    finally:
        answer = admin.http.delete(path)
    assert answer.status_code == 200, answer.text
    with pytest.raises(openai.NotFoundError):
        ask(client, "demo-chat:second")
    assert admin.http.delete(path).status_code == 404
    # The engine was not replaced: the demo adapter still answers at once.
    assert ask(client, "demo-chat:sample").model == "demo-chat:sample"
    rows = {r["name"]: r for r in admin.http.get("/models").json()["data"]}
    assert rows["demo-chat"]["state"] == "ready"
    assert rows["demo-chat"]["cold_starts"] == 0


def test_adapters_are_the_operators_to_register(gateway: Gateway, api_key: str) -> None:
    answer = httpx.put(
        gateway.base_url + "/admin/v1/models/demo-chat/adapters/mine",
        headers={"authorization": f"Bearer {api_key}"},
        json={"source": "/srv/none"},
    )
    assert answer.status_code == 403, answer.text


def test_more_adapters_than_device_slots_take_turns(admin: Admin, client: openai.OpenAI) -> None:
    """demo-chat keeps 4 adapters on the device (max_loras): with six registered, each
    answers in turn, the engine swapping the least recently used out."""
    names = [f"turn{i}" for i in range(5)]
    source = {"source": "{data_dir}/models/demo-chat-sample-lora"}
    try:
        for name in names:
            answer = admin.http.put(f"/models/demo-chat/adapters/{name}", json=source)
            assert answer.status_code == 201, answer.text
        expected = ask(client, "demo-chat:sample").choices[0].message.content
        for _ in range(2):
            for name in names:
                reply = ask(client, f"demo-chat:{name}")
                assert reply.model == f"demo-chat:{name}"
                assert reply.choices[0].message.content == expected
    finally:
        for name in names:
            admin.http.delete(f"/models/demo-chat/adapters/{name}")
    listed = {m.id for m in client.models.list()}
    assert not listed & {f"demo-chat:{n}" for n in names}


def test_a_key_may_be_limited_to_one_adapter(gateway: Gateway, admin: Admin) -> None:
    tenant = admin.tenant("one-adapter")
    answer = admin.http.post(
        f"/tenants/{tenant}/keys", json={"name": "adapter-only", "models": ["demo:sample"]}
    )
    assert answer.status_code == 201, answer.text
    admin.secrets.append(answer.json()["value"])
    assert answer.json()["models"] == ["demo-chat:sample"]
    key = answer.json()["value"]
    with openai.OpenAI(base_url=gateway.api_url, api_key=key, max_retries=0) as c:
        assert [m.id for m in c.models.list()] == ["demo-chat:sample"]
        assert ask(c, "demo-chat:sample").model == "demo-chat:sample"
        with pytest.raises(openai.PermissionDeniedError):
            ask(c, "demo-chat")
