"""A gateway killed with SIGKILL under load loses no usage event and duplicates none.

Two deployments: the shared one (PostgreSQL ledger, Redis outbox), where another replica
catches up on what the dead one left, and the embedded default (SQLite ledger and outbox,
in-process quota store), restarted on the same files. Requests flow from several threads;
the gateway is killed mid-flow.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.conftest import Deployment, Gateway, start_gateway, stop_gateway, wait_ready
from tests.support.catalogs import CHAT_ONLY

WORKERS = 8


@dataclass
class Load:
    """Requests from several threads; remembers which were answered and how many were not."""

    url: str
    key: str
    answered: list[str] = field(default_factory=list)
    unanswered: int = 0
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self) -> None:
        with httpx.Client(
            base_url=self.url, headers={"authorization": f"Bearer {self.key}"}, timeout=30
        ) as http:
            while not self.stop.is_set():
                try:
                    answer = http.post(
                        "/completions",
                        json={"model": "demo-chat", "prompt": "tick", "max_tokens": 4},
                    )
                except httpx.TransportError:
                    with self.lock:
                        self.unanswered += 1
                    return
                if answer.status_code == 200:
                    with self.lock:
                        self.answered.append(answer.headers["x-request-id"])


def kill_under_load(gw: Gateway, key: str) -> Load:
    load = Load(gw.api_url, key)
    threads = [threading.Thread(target=load.run) for _ in range(WORKERS)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(load.answered) < 40:
        assert time.monotonic() < deadline, "the gateway answered too little under load"
        time.sleep(0.05)
    os.killpg(gw.process.pid, signal.SIGKILL)
    gw.process.wait()
    for t in threads:
        t.join(30)
    load.stop.set()
    return load


def ledger_ids(base_url: str, admin_token: str, tenant: str, expected: set[str]) -> list[str]:
    """Every event id of ``tenant`` in the ledger, once all of ``expected`` are there."""
    deadline = time.monotonic() + 60
    while True:
        answer = httpx.get(
            base_url + "/admin/v1/billing/export",
            params={"tenant": tenant, "format": "jsonl", "start": "2000-01-01"},
            headers={"authorization": f"Bearer {admin_token}"},
            timeout=30,
        )
        assert answer.status_code == 200, answer.text
        ids = [json.loads(line)["id"] for line in answer.text.splitlines() if line]
        if expected <= set(ids):
            return ids
        missing = len(expected - set(ids))
        assert time.monotonic() < deadline, f"{missing} answered requests have no event"
        time.sleep(0.5)


def check(load: Load, ids: list[str]) -> None:
    assert len(ids) == len(set(ids)), "an event was written twice"
    answered = set(load.answered)
    assert len(answered) == len(load.answered)
    assert answered <= set(ids), "an answered request lost its event"
    # Requests cut off by the kill may have been recorded just before their answer was sent;
    # nothing else may be in the ledger.
    assert len(set(ids) - answered) <= load.unanswered


@pytest.fixture
def catalog(tmp_path: Path) -> Path:
    path = tmp_path / "chat-only.toml"
    path.write_text(CHAT_ONLY)
    return path


def test_sigkill_shared_deployment(
    deployment: Deployment,
    gateway: Gateway,
    admin_token_tenant: tuple[str, str],
    catalog: Path,
    tmp_path: Path,
) -> None:
    tenant, key = admin_token_tenant
    gw = start_gateway(deployment, tmp_path / "victim.log", "--models", str(catalog))
    wait_ready(gw)
    load = kill_under_load(gw, key)
    # Another replica of the deployment takes over what the dead one left in the shared
    # outbox (its flusher claims a dead consumer's pending entries).
    ids = ledger_ids(gateway.base_url, deployment.admin_token, tenant, set(load.answered))
    time.sleep(2)  # anything redelivered late would show up as a duplicate now
    ids = ledger_ids(gateway.base_url, deployment.admin_token, tenant, set(load.answered))
    check(load, ids)


@pytest.fixture
def admin_token_tenant(gateway: Gateway, deployment: Deployment) -> tuple[str, str]:
    admin = {"authorization": f"Bearer {deployment.admin_token}"}
    tenant = httpx.post(
        gateway.base_url + "/admin/v1/tenants", json={"name": "crash"}, headers=admin
    ).json()["id"]
    key = httpx.post(
        gateway.base_url + f"/admin/v1/tenants/{tenant}/keys", json={"name": "k"}, headers=admin
    ).json()["value"]
    deployment.secrets.append(key)
    return tenant, key


@pytest.fixture
def embedded(deployment: Deployment, data_dir: Path, tmp_path: Path) -> dict[str, str]:
    """The embedded default's settings on a data dir of its own (the demo models linked)."""
    own = tmp_path / "data"
    own.mkdir()
    (own / "models").symlink_to((data_dir / "models").resolve())
    token = "tga_" + secrets.token_urlsafe(24)
    deployment.secrets.append(token)
    return {
        "TOLLGATE_DATA_DIR": str(own),
        "TOLLGATE_ADMIN_TOKEN": token,
        "TOLLGATE_DATABASE_URL": "",
        "TOLLGATE_REDIS_URL": "",
        "TOLLGATE_SECRET": "",
    }


def test_sigkill_embedded_default(
    deployment: Deployment, embedded: dict[str, str], catalog: Path, tmp_path: Path
) -> None:
    gw = start_gateway(deployment, tmp_path / "victim.log", "--models", str(catalog), **embedded)
    wait_ready(gw)
    admin = {"authorization": f"Bearer {embedded['TOLLGATE_ADMIN_TOKEN']}"}
    tenant = httpx.post(
        gw.base_url + "/admin/v1/tenants", json={"name": "crash"}, headers=admin
    ).json()["id"]
    key = httpx.post(
        gw.base_url + f"/admin/v1/tenants/{tenant}/keys", json={"name": "k"}, headers=admin
    ).json()["value"]
    deployment.secrets.append(key)
    load = kill_under_load(gw, key)
    # Restarted on the same files with a device budget that starts no engine: what it must
    # catch up on is in its outbox, not on its device.
    again = start_gateway(
        deployment,
        tmp_path / "restarted.log",
        "--models",
        str(catalog),
        TOLLGATE_DEVICE_MEMORY_GB="0.01",
        **embedded,
    )
    try:
        wait_ready(again)
        token = embedded["TOLLGATE_ADMIN_TOKEN"]
        ids = ledger_ids(again.base_url, token, tenant, set(load.answered))
        check(load, ids)
        assert (Path(embedded["TOLLGATE_DATA_DIR"]) / "tollgate.db").exists()
    finally:
        stop_gateway(again)
