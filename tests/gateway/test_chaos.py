"""Chaos: hundreds of mixed requests, clients cut at random points, Redis restarted and an
engine killed in the middle. Afterwards the books balance.

The requests mix chat and completions (streamed or not, ``n`` > 1, several prompts, seeded)
and embeddings; a fifth of the clients leave early, at a random point: right after sending,
a few milliseconds later, after the headers, mid-answer, or right after the last byte.
Midway Redis (quotas and the usage outbox) is stopped and started again, and later one
engine process is killed. Then:

- every request whose answer named its id has exactly one usage event, and no id twice;
- no reservation is open and every concurrency slot is free;
- the tenant's token and spend counters equal the sums of its events (to the nano-dollar);
- the engines serve again, and the gateway logged nothing unexpected.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from billing.pricing import to_nano_usd
from gateway.quotas import RedisQuotaStore
from tests.conftest import Deployment, Gateway, chat_engine_core
from tests.support.admin import Admin
from tests.support.raw import connect, head_of, read_all, read_until, request_bytes
from tests.support.waits import events_of

REQUESTS = 400
WORKERS = 12
CUTS = ("sent", "early", "headers", "mid", "done")


@dataclass
class Seen:
    """What one client saw: the status and the id, when the headers arrived."""

    cut: str
    status: int | None = None
    request_id: str | None = None
    body: bytes = b""
    request: dict[str, Any] = field(default_factory=dict)


@dataclass
class Run:
    url: str
    key: str
    rng: random.Random
    seen: list[Seen] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    done: int = 0
    stop: threading.Event = field(default_factory=threading.Event)

    def request(self) -> tuple[str, dict[str, Any]]:
        rng = self.rng
        kind = rng.choices(["chat", "text", "embed"], weights=[4, 4, 2])[0]
        if kind == "embed":
            inputs = [f"chaos embedding {rng.random()}" for _ in range(rng.randint(1, 4))]
            return "/v1/embeddings", {"model": "minilm", "input": inputs}
        body: dict[str, Any] = {
            "model": "demo-chat",
            "max_tokens": rng.randint(4, 48),
            "n": rng.choice([1, 1, 2, 3]),
            "stream": rng.random() < 0.5,
        }
        if rng.random() < 0.5:
            body["ignore_eos"] = True
        if rng.random() < 0.3:
            body["seed"] = rng.randint(0, 10**6)
            body["temperature"] = 0.8
        elif rng.random() < 0.5:
            body["temperature"] = 0
        if body["stream"] and rng.random() < 0.5:
            body["stream_options"] = {"include_usage": True}
        if kind == "chat":
            body["messages"] = [{"role": "user", "content": f"chaos {rng.random()}"}]
            return "/v1/chat/completions", body
        prompts = [f"chaos prompt {rng.random()}" for _ in range(rng.randint(1, 3))]
        body["prompt"] = prompts[0] if len(prompts) == 1 else prompts
        return "/v1/completions", body

    def one(self, path: str, body: dict[str, Any], cut: str | None, pause: float) -> Seen:
        seen = Seen(cut or "none", request=body)
        sock = connect(self.url)
        try:
            sock.sendall(request_bytes(self.url, path, body, self.key, close=True))
            if cut == "sent":
                return seen
            if cut == "early":
                time.sleep(pause)
                return seen
            data = read_until(sock, b"\r\n\r\n")
            seen.status, headers = head_of(data)
            seen.request_id = headers.get("x-request-id")
            if cut == "headers":
                return seen
            streamed = headers.get("content-type", "").startswith("text/event-stream")
            if cut == "mid":
                read_until(sock, b"data: {" if streamed else b"{")
                return seen
            if cut == "done":  # close the moment the last byte is in
                if streamed:
                    read_until(sock, b"data: [DONE]")
                else:
                    length = int(headers.get("content-length", "0"))
                    body_at = data.index(b"\r\n\r\n") + 4
                    while len(data) - body_at < length:
                        chunk = sock.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                return seen
            seen.body = read_all(sock)
            return seen
        except OSError:
            return seen
        finally:
            sock.close()

    async def reach(self, count: int, within_s: float = 300) -> None:
        """Wait until ``count`` requests have been sent."""
        deadline = time.monotonic() + within_s
        while self.done < count:
            assert time.monotonic() < deadline, f"only {self.done} requests sent"
            await asyncio.sleep(0.05)

    def worker(self) -> None:
        while not self.stop.is_set():
            with self.lock:
                self.done += 1
                path, body = self.request()
                cut = self.rng.choice(CUTS) if self.rng.random() < 0.2 else None
                pause = self.rng.uniform(0, 0.03)
            seen = self.one(path, body, cut, pause)
            with self.lock:
                self.seen.append(seen)


@pytest.fixture(scope="module")
def chaos_gateway(victim: Gateway, deployment: Deployment) -> Iterator[Gateway]:
    """A gateway with both demo models, whose Redis is restarted and engine killed."""
    try:
        yield victim
    finally:
        deployment.redis.resume()
        deployment.redis.start()


@pytest.fixture
async def store(deployment: Deployment) -> AsyncIterator[RedisQuotaStore]:
    quota_store = RedisQuotaStore.from_url(deployment.redis.url, timeout_s=2)
    yield quota_store
    await quota_store.close()


def kill_chat_engine(gw: Gateway) -> int:
    """SIGKILL demo-chat's engine core process; its pid."""
    core = chat_engine_core(gw)
    core.kill()
    return int(core.pid)


def models_state(gw: Gateway) -> dict[str, Any]:
    return dict(httpx.get(gw.base_url + "/readyz", timeout=5).json()["models"])


async def test_chaos_leaves_the_books_balanced(
    chaos_gateway: Gateway,
    deployment: Deployment,
    admin: Admin,
    store: RedisQuotaStore,
    tmp_path: Path,
) -> None:
    gw = chaos_gateway
    for model, price in (
        ("minilm", {"input_per_mtok": "0.02"}),
        (
            "demo-chat",
            {"input_per_mtok": "1.5", "cached_input_per_mtok": "0.15", "output_per_mtok": "6"},
        ),
    ):
        current = [p for p in admin.http.get("/prices").json()["data"] if p["model"] == model]
        if not current:
            assert admin.http.put(f"/prices/{model}", json=price).status_code == 200
    tenant = admin.tenant(
        "chaos",
        rpm=100_000,
        tpm=100_000_000,
        max_concurrency=WORKERS,
        daily_tokens=100_000_000,
        monthly_spend_usd="1000",
    )
    key = admin.key(tenant)
    log_at = len(gw.log())
    run = Run(gw.base_url, key, random.Random(20261201))  # noqa: S311 (a reproducible mix, no secret)
    threads = [threading.Thread(target=run.worker) for _ in range(WORKERS)]
    for t in threads:
        t.start()
    try:
        await run.reach(REQUESTS // 4)
        deployment.redis.stop()
        await asyncio.sleep(1.5)
        deployment.redis.start()
        await run.reach(REQUESTS // 2)
        killed = kill_chat_engine(gw)
        # The load goes on while the engine is down and restarts, then some more.
        deadline = time.monotonic() + 180
        while (state := models_state(gw)) and not (
            sum(m["restarts"] for m in state.values()) == 1
            and all(m["state"] == "ready" for m in state.values())
        ):
            assert time.monotonic() < deadline, f"engines not back: {state}"
            await asyncio.sleep(0.2)
        await run.reach(max(REQUESTS, run.done + 40))
    finally:
        run.stop.set()
        for t in threads:
            await asyncio.to_thread(t.join, 300)
    assert len(run.seen) >= REQUESTS
    assert killed not in {p.pid for p in psutil.Process(gw.process.pid).children(recursive=True)}
    async with httpx.AsyncClient(
        base_url=gw.api_url, headers={"authorization": f"Bearer {key}"}, timeout=60
    ) as http:
        chat = await http.post(
            "/chat/completions",
            json={"model": "demo-chat", "messages": [{"role": "user", "content": "after"}]},
        )
        assert chat.status_code == 200, chat.text
        embed = await http.post("/embeddings", json={"model": "minilm", "input": "after"})
        assert embed.status_code == 200, embed.text
    known = {s.request_id for s in run.seen if s.request_id} | {
        chat.headers["x-request-id"],
        embed.headers["x-request-id"],
    }
    statuses = {s.status for s in run.seen if s.status is not None}
    odd = [
        (s.status, s.request, s.body[-300:])
        for s in run.seen
        if s.status not in (None, 200, 429, 503)
    ]
    assert not odd, odd[:3]
    assert 200 in statuses
    cut = sum(1 for s in run.seen if s.cut != "none")
    assert cut > REQUESTS // 10

    # Every request with a known id has one event, and no event is there twice.
    deadline = time.monotonic() + 60
    while True:
        await asyncio.sleep(1.0)
        rows = events_of(admin, tenant, len(known), timeout=60)
        ids = [r["id"] for r in rows]
        usage = await store.usage(tenant, f"tenant:{tenant}")
        if known <= set(ids) and usage.open_reservations == 0 and usage.in_flight == 0:
            break
        assert time.monotonic() < deadline, (
            f"missing events {len(known - set(ids))}, open reservations {usage}"
        )
    assert len(ids) == len(set(ids)), "an event was written twice"
    assert len(ids) <= len(run.seen) + 2
    assert {r["status"] for r in rows} <= {"ok", "aborted", "error", "rejected"}
    # Quotas settled to the events, exactly.
    assert usage.daily_tokens == sum(r["prompt_tokens"] + r["completion_tokens"] for r in rows)
    assert usage.monthly_spend_nusd == sum(to_nano_usd(Decimal(r["cost_usd"])) for r in rows)
    assert any(Decimal(r["cost_usd"]) > 0 for r in rows)
    # Nothing went wrong beyond what was done to it.
    expected = ("died", "did not restart", "does not answer", "stopped while serving")
    unexpected = [
        line
        for line in gw.log()[log_at:].splitlines()
        if (" ERROR " in line or "Traceback" in line) and not any(e in line for e in expected)
    ]
    assert not unexpected, "\n".join(unexpected[:20])
