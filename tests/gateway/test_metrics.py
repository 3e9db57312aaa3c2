"""``/metrics``: Prometheus text for the operator, with no tenant data in it."""

from __future__ import annotations

import secrets

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Deployment, Gateway
from tests.support.admin import Admin

MODEL = "demo-chat"


def scrape(gateway: Gateway, token: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    answer = httpx.get(
        gateway.base_url + "/metrics", headers={"authorization": f"Bearer {token}"}, timeout=30
    )
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain")
    families: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            families.setdefault(sample.name, []).append((sample.labels, sample.value))
    return families


def value(samples: list[tuple[dict[str, str], float]], **labels: str) -> float:
    return sum(v for found, v in samples if all(found.get(k) == w for k, w in labels.items()))


def test_metrics_count_cache_queue_and_engine_time(
    gateway: Gateway, deployment: Deployment, admin: Admin
) -> None:
    tenant = admin.tenant("metrics-" + secrets.token_hex(3))
    key = admin.key(tenant)
    before = scrape(gateway, deployment.admin_token)
    body = {"model": MODEL, "prompt": secrets.token_hex(6), "max_tokens": 8, "temperature": 0}
    with httpx.Client(
        base_url=gateway.api_url, headers={"authorization": f"Bearer {key}"}, timeout=60
    ) as api:
        statuses = [api.post("/completions", json=body).headers["x-tollgate-cache"] for _ in "ab"]
    assert statuses == ["miss", "hit"]
    after = scrape(gateway, deployment.admin_token)
    answers = "tollgate_cache_answers_total"
    for status in ("miss", "hit"):
        grew = value(after[answers], model=MODEL, status=status) - value(
            before.get(answers, []), model=MODEL, status=status
        )
        assert grew == 1, status
    assert value(after["tollgate_gpu_seconds_total"], model=MODEL) > value(
        before["tollgate_gpu_seconds_total"], model=MODEL
    )
    assert value(after["tollgate_engine_busy_seconds_total"], model=MODEL) > 0
    assert value(after["tollgate_queue_wait_seconds_count"], model=MODEL) >= 1
    assert "tollgate_prefix_cache_hit_ratio" in after
    assert "tollgate_queue_slots" in after
    # The device's pool: every model resident, within the budget.
    assert value(after["tollgate_model_state"], model=MODEL, state="ready") == 1
    assert value(after["tollgate_model_memory_bytes"], model=MODEL) > 0
    used = value(after["tollgate_device_memory_used_bytes"])
    assert 0 < used <= value(after["tollgate_device_memory_budget_bytes"])
    assert value(after["tollgate_model_cold_starts_total"], model=MODEL) == 0
    # Labels name models, statuses and classes; never a tenant or a key.
    text = httpx.get(
        gateway.base_url + "/metrics",
        headers={"authorization": f"Bearer {deployment.admin_token}"},
    ).text
    assert tenant not in text
    assert key not in text


def test_metrics_are_the_operators(gateway: Gateway, api_key: str) -> None:
    url = gateway.base_url + "/metrics"
    assert httpx.get(url, timeout=30).status_code == 401
    tenant = httpx.get(url, headers={"authorization": f"Bearer {api_key}"}, timeout=30)
    assert tenant.status_code == 403
