"""Waiting for what the gateway does after it answers: settlements and flushed events."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from gateway.quotas import RedisQuotaStore, ScopeUsage
from tests.support.admin import Admin


async def settled(store: RedisQuotaStore, tenant: str, scope: str) -> ScopeUsage:
    """The scope's usage once every reservation of it has been settled (settling is async)."""
    deadline = time.monotonic() + 10
    while True:
        usage = await store.usage(tenant, scope)
        if usage.open_reservations == 0 and usage.in_flight == 0:
            return usage
        assert time.monotonic() < deadline, f"reservations still open: {usage}"
        await asyncio.sleep(0.05)


def events_of(
    admin: Admin, tenant: str, expected: int, timeout: float = 20
) -> list[dict[str, Any]]:
    """The tenant's events in the ledger once ``expected`` of them have been flushed."""
    deadline = time.monotonic() + timeout
    while True:
        answer = admin.http.get(
            "/billing/export",
            params={"tenant": tenant, "format": "jsonl", "start": "2000-01-01"},
        )
        assert answer.status_code == 200, answer.text
        rows = [json.loads(line) for line in answer.text.splitlines() if line]
        if len(rows) >= expected:
            return rows
        assert time.monotonic() < deadline, f"{len(rows)} of {expected} events in the ledger"
        time.sleep(0.2)


def wait_serving(
    what: str,
    url: str,
    process: subprocess.Popen[bytes],
    log: Callable[[], str],
    timeout_s: float,
) -> None:
    """Until the process at ``url`` answers ``/readyz`` with 200; fails with the end of its
    log when it exits first or is not ready in time."""
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            pytest.fail(f"{what} exited with {process.returncode}:\n{log()[-5000:]}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not ready after {timeout_s} s:\n{log()[-5000:]}")
        time.sleep(0.5)
