"""What keys and quotas add to a request, on the memory store and on Redis.

Two measurements, each printing medians and ratios taken in one run:

1. In process, the exact work a request does for them: authenticate the key (cached, as on
   every request after the first second) and reserve in the quota store, timed per request;
   then the settlement each request queues when it ends (off the answer's path, but on the
   event loop). Accounts live in SQLite; Redis is ``TOLLGATE_REDIS_URL`` or a throwaway
   ``redis-server``.
2. Through the whole app: three gateway apps in one process on ONE shared demo-chat engine
   (auth off; auth and quotas on the memory store; auth and quotas on Redis), called over
   ASGI. Minimal completions (``max_tokens=1``) go to them in interleaved order, one at a time
   (latency p50, p99, and the difference to auth off), then in concurrent rounds (requests
   per second, median over rounds). Separate gateway processes would each need an engine,
   and three engines on a small machine drown a sub-millisecond difference in their noise.

    .venv/bin/python bench/gateway.py [--requests 3000] [--app-requests 500] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _common import percentile, redis_url  # noqa: E402 (bench/ is the script's folder)

from tests.support.catalogs import CHAT_ONLY  # noqa: E402 (after the path is set)

LIMITS = {
    "rpm": 10**9,
    "tpm": 10**12,
    "max_concurrency": 10**6,
    "daily_tokens": 10**12,
    "monthly_tokens": 10**12,
}


def line(name: str, values_s: list[float], base_p50_s: float | None = None) -> float:
    p50, p99 = percentile(values_s, 0.5) * 1e3, percentile(values_s, 0.99) * 1e3
    extra = ""
    if base_p50_s is not None:
        extra = f"   added p50 {p50 - base_p50_s * 1e3:+.3f} ms"
    print(f"  {name:<34} p50 {p50:8.3f} ms   p99 {p99:8.3f} ms{extra}")
    return p50 / 1e3


# Part 1: in process


async def in_process(requests: int, url: str) -> None:
    from gateway.admission import Admission
    from gateway.auth import Authenticator
    from gateway.db import AccountStore, make_engine, upgrade
    from gateway.keys import generate_key
    from gateway.quotas import MemoryQuotaStore, QuotaStore, RedisQuotaStore
    from gateway.quotas.watchdog import StoreWatchdog
    from gateway.telemetry import Telemetry

    folder = Path(tempfile.mkdtemp())
    database = f"sqlite:///{folder / 'bench.db'}"
    upgrade(database)
    accounts = AccountStore(make_engine(database))
    secret = secrets.token_bytes(32)
    tenant = await accounts.create_tenant("bench")
    await accounts.set_quota(tenant.id, None, **LIMITS)
    _, key = await accounts.create_key(tenant.id, name="bench", secret=secret)
    header = f"Bearer {key}"
    authenticator = Authenticator(accounts, secret=secret, admin_token=generate_key())
    print(f"In process, {requests:,} requests each (auth cached, reserve; then settle):")
    stores: list[tuple[str, QuotaStore]] = [
        ("memory", MemoryQuotaStore()),
        ("redis", RedisQuotaStore.from_url(url, timeout_s=1.0)),
    ]
    for name, store in stores:
        watchdog = None
        if isinstance(store, RedisQuotaStore):
            watchdog = StoreWatchdog.for_redis(url, timeout_s=0.15)
            watchdog.start()
        admission = Admission(store, Telemetry(), fail_open=False, lease_s=900, watchdog=watchdog)
        await authenticator.authenticate(header)  # warm the key cache, as in steady state
        admit_s: list[float] = []
        settle_s: list[float] = []
        for i in range(requests):
            began = time.perf_counter()
            principal = await authenticator.authenticate(header)
            ticket = await admission.admit(principal, f"req_{name}_{i}", "demo-chat", 20, 1)
            admitted = time.perf_counter()
            await admission.store.settle(ticket.partition, ticket.request_id, 21, 0)
            admit_s.append(admitted - began)
            settle_s.append(time.perf_counter() - admitted)
        line(f"{name}: auth + reserve", admit_s)
        line(f"{name}: settle", settle_s)
        total = sum(admit_s) + sum(settle_s)
        print(f"  {name}: {requests / total:,.0f} admissions and settlements a second")
        await admission.close()
    await accounts.close()
    shutil.rmtree(folder, ignore_errors=True)


# Part 2: through the whole app


async def through_the_app(url: str, requests: int, rounds: int, concurrency: int) -> None:
    """Three apps on one shared engine, called in process over ASGI, in interleaved order.

    One engine serves all three, so the engine's own time is the same for each and only
    what the apps do differs; an in-process ASGI client leaves out the sockets and HTTP
    parsing, which are the same for all three too.
    """
    import httpx

    from gateway.app import create_app
    from gateway.settings import Settings
    from gateway.telemetry import Telemetry
    from serving import EngineHost, load_catalog
    from serving.demo import prepare_demo_models

    data_root = ROOT / ".tollgate"
    prepare_demo_models(data_root / "models")
    catalog = Path(tempfile.mkdtemp()) / "chat-only.toml"
    catalog.write_text(CHAT_ONLY)
    host = EngineHost(load_catalog(catalog, data_root))
    await host.start()

    def settings(auth: bool, redis: str | None) -> Settings:
        return Settings(
            data_dir=tempfile.mkdtemp(),
            auth=auth,
            admin_token="tga_" + secrets.token_urlsafe(24) if auth else None,
            redis_url=redis,
            log_level="WARNING",
        )

    configs = {
        "auth off": settings(False, None),
        "auth + quotas, memory store": settings(True, None),
        "auth + quotas, redis store": settings(True, url),
    }
    clients: dict[str, httpx.AsyncClient] = {}
    async with contextlib.AsyncExitStack() as stack:
        for name, config in configs.items():
            app = create_app(config, host=host, telemetry=Telemetry(), own_engines=False)
            await stack.enter_async_context(app.lifespan())  # on this loop, like the engine
            client = await stack.enter_async_context(
                httpx.AsyncClient(
                    transport=httpx.ASGITransport(app=app), base_url="http://app", timeout=120
                )
            )
            if config.auth:
                admin = {"authorization": f"Bearer {config.admin_token}"}
                made = await client.post("/admin/v1/tenants", json={"name": "b"}, headers=admin)
                tenant = made.json()["id"]
                await client.put(f"/admin/v1/tenants/{tenant}/quota", json=LIMITS, headers=admin)
                issued = await client.post(
                    f"/admin/v1/tenants/{tenant}/keys", json={"name": "b"}, headers=admin
                )
                client.headers["authorization"] = f"Bearer {issued.json()['value']}"
            clients[name] = client
        names = list(configs)

        async def one(name: str) -> float:
            began = time.perf_counter()
            response = await clients[name].post("/v1/completions", json=BODY)
            response.raise_for_status()
            return time.perf_counter() - began

        for name in names:  # warm-up: connections, key caches, the engine
            for _ in range(20):
                await one(name)
        samples: dict[str, list[float]] = {name: [] for name in names}
        for _ in range(requests):
            random.shuffle(names)
            for name in names:
                samples[name].append(await one(name))
        names = list(configs)
        print(f"Through the app, one at a time, {requests:,} requests each (interleaved):")
        base = line(names[0], samples[names[0]])
        for name in names[1:]:
            line(name, samples[name], base)

        per_round = concurrency * 8
        rates: dict[str, list[float]] = {name: [] for name in names}
        for _ in range(rounds):
            random.shuffle(names)
            for name in names:
                began = time.perf_counter()
                remaining = iter(range(per_round))

                async def worker(name: str = name, remaining: Iterator[int] = remaining) -> None:
                    for _ in remaining:
                        await one(name)

                await asyncio.gather(*(worker() for _ in range(concurrency)))
                rates[name].append(per_round / (time.perf_counter() - began))
        names = list(configs)
        print(f"Through the app, {concurrency} concurrent, {per_round} a round, {rounds} rounds:")
        first = statistics.median(rates[names[0]])
        for name in names:
            rps = statistics.median(rates[name])
            each = ", ".join(f"{v:,.0f}" for v in rates[name])
            print(f"  {name:<34} {rps:8,.0f} req/s (x{rps / first:.3f})   rounds: {each}")
    await host.shutdown()


BODY = {"model": "demo-chat", "prompt": "hello", "max_tokens": 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000, help="in-process requests")
    parser.add_argument("--app-requests", type=int, default=500, help="requests each, in app")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--skip-app", action="store_true")
    args = parser.parse_args()
    with redis_url(db=1) as url:
        asyncio.run(in_process(args.requests, url))
        if not args.skip_app:
            asyncio.run(through_the_app(url, args.app_requests, args.rounds, args.concurrency))


if __name__ == "__main__":
    main()
