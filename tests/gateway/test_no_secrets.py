"""No key, admin token or Authorization header in any log record, span or error body.

Runs last: it searches everything the whole test run left behind.
"""

from __future__ import annotations

import re

import httpx
import pytest

from tests.conftest import Collector, Deployment, Gateway

pytestmark = pytest.mark.last

_BEARER = re.compile(rb"[Bb]earer\s+[A-Za-z0-9_\-]{8,}")


def test_secrets_stay_out_of_logs_spans_and_errors(
    gateway: Gateway, deployment: Deployment, otlp_collector: Collector
) -> None:
    # Provoke the paths most likely to echo a credential: bad keys, admin token on the API,
    # a key where the admin API wants an admin, a key in a body.
    key = next(s for s in deployment.secrets if s.startswith("tg_"))
    with httpx.Client(base_url=gateway.base_url, timeout=30) as http:
        for auth in (f"Bearer {key}x", f"Bearer {key[:-1]}", f"Basic {key}", key):
            response = http.get("/v1/models", headers={"authorization": auth})
            deployment.error_bodies.append(response.text)
        response = http.post(
            "/admin/v1/tenants",
            json={"name": "n", "key": key},
            headers={"authorization": f"Bearer {deployment.admin_token}"},
        )
        deployment.error_bodies.append(response.text)
    assert len(deployment.secrets) >= 10  # the run did issue keys
    assert deployment.error_bodies
    haystacks: dict[str, bytes] = {}
    for gw in deployment.gateways:
        haystacks[f"log {gw.log_path}"] = gw.log_path.read_bytes()
        # The engines' own output goes to a file of its own under the data directory.
        for engine_log in sorted(gw.data_dir.glob("logs/*.log")):
            haystacks[f"engine log {engine_log}"] = engine_log.read_bytes()
    assert any(name.startswith("engine log") for name in haystacks)
    for kind in ("traces", "metrics"):
        for i, body in enumerate(otlp_collector.bodies(kind)):
            haystacks[f"{kind} export {i}"] = body
    for i, body in enumerate(deployment.error_bodies):
        haystacks[f"error body {i}"] = body.encode()
    assert any(name.startswith("traces") for name in haystacks)
    for name, data in haystacks.items():
        for secret in deployment.secrets:
            assert secret.encode() not in data, f"a secret appears in {name}"
            assert secret[:-4].encode() not in data, f"most of a secret appears in {name}"
        assert not _BEARER.search(data), f"an Authorization header appears in {name}"
