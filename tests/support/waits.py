"""Waiting for what the gateway does after it answers: settlements and flushed events."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

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
