"""Quotas hold across replicas: three gateway processes on one Redis and one database."""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import Deployment, Gateway, start_gateway, stop_gateway, wait_ready
from tests.support.admin import Admin
from tests.support.catalogs import CHAT_ONLY


@pytest.fixture(scope="module")
def replicas(
    gateway: Gateway, deployment: Deployment, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[Gateway]]:
    """Three replicas serving demo-chat.

    Three engines and three gateways on two cores can starve Redis of the CPU for longer than
    the deployment's quota timeout (vLLM's engine workers busy-wait after each step), which
    the replicas would take for an outage and fail open: these allow Redis 3 s.
    """
    folder = tmp_path_factory.mktemp("replicas")
    catalog = folder / "chat-only.toml"
    catalog.write_text(CHAT_ONLY)
    extra = [
        start_gateway(
            deployment,
            folder / f"replica-{i}.log",
            "--models",
            str(catalog),
            TOLLGATE_QUOTA_TIMEOUT_MS="3000",
        )
        for i in range(3)
    ]
    try:
        for gw in extra:
            wait_ready(gw)
        yield extra
    finally:
        for gw in extra:
            stop_gateway(gw)


def finished(gw: Gateway) -> int:
    """The requests the replica's own engine has finished (its scheduler's count)."""
    return int(
        httpx.get(gw.base_url + "/readyz").json()["models"]["demo-chat"]["requests_finished"]
    )


async def test_rpm_is_exact_across_three_replicas(replicas: list[Gateway], admin: Admin) -> None:
    tenant = admin.tenant("three-replicas", rpm=100)
    key = admin.key(tenant)
    before = [finished(gw) for gw in replicas]
    targets = itertools.cycle(replicas)
    clients = [
        httpx.AsyncClient(
            base_url=gw.api_url,
            headers={"authorization": f"Bearer {key}"},
            timeout=300,
            limits=httpx.Limits(max_connections=400, max_keepalive_connections=400),
        )
        for gw in replicas
    ]
    by_url = {str(c.base_url).rstrip("/"): c for c in clients}
    body = {"model": "demo-chat", "prompt": "hello", "max_tokens": 1}
    try:
        answers = await asyncio.gather(
            *(by_url[next(targets).api_url].post("/completions", json=body) for _ in range(1000))
        )
    finally:
        for c in clients:
            await c.aclose()
    statuses = Counter(a.status_code for a in answers)
    assert statuses == {200: 100, 429: 900}, statuses
    # Each admission counted down one shared counter: the 100 answers that got through say
    # 99, 98, ..., 0 requests remain, each once (replicas counting apart would repeat them).
    remaining = sorted(
        int(a.headers["x-ratelimit-remaining-requests"]) for a in answers if a.status_code == 200
    )
    assert remaining == list(range(100))
    for refused in (a for a in answers if a.status_code == 429):
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    # Every replica refused some (each had more than 100 sent to it, and each refusal came
    # from the shared counter), and the replicas' engines ran exactly the admitted ones.
    by_replica = Counter(
        (str(a.request.url.port), a.status_code) for a in answers if a.status_code == 429
    )
    assert len(by_replica) == 3, by_replica
    deadline = asyncio.get_running_loop().time() + 30
    while sum(finished(gw) for gw in replicas) - sum(before) < 100:
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.2)
    await asyncio.sleep(1.0)
    ran = [finished(gw) - b for gw, b in zip(replicas, before, strict=True)]
    assert sum(ran) == 100, ran
