"""What the usage ledger sustains, and what the outbox adds to each request.

Two measurements, each printing figures and their ratio to the target:

1. Flusher throughput into PostgreSQL: events per second a `Flusher` (batch 1000) moves from
   a full outbox into the ledger (events, rollups, acknowledgement), from a Redis outbox and
   from the SQL outbox in the ledger's own database; the median of ``--runs`` runs of
   ``--events`` events each. Target: at least 5,000 events/s.
2. Append latency: the time one ``await outbox.append(event)`` takes, p50 and p99 over
   ``--appends`` sequential appends, for the SQL outbox on a SQLite file (alone, and with a
   flusher draining it meanwhile), the SQL outbox on PostgreSQL, and the Redis outbox.
   Target: p50 at most 0.2 ms.

PostgreSQL: a fresh database on the server of ``TOLLGATE_DATABASE_URL`` (dropped at the
end), else on a local server (or a throwaway one, as the tests find it). Redis:
``TOLLGATE_REDIS_URL``, else a throwaway ``redis-server`` (append-only file, fsync every
second, as a production Redis would run).

    .venv/bin/python bench/ledger.py [--events 50000] [--runs 3] [--appends 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# After the path is set: the benchmark runs from a checkout.
import redis  # noqa: E402
import redis.asyncio  # noqa: E402
from _common import percentile, postgres_url, redis_url  # noqa: E402 (bench/ is the script's folder)
from sqlalchemy import Engine, delete, insert  # noqa: E402

from billing.events import UsageEvent, encode_event  # noqa: E402
from billing.flusher import Flusher  # noqa: E402
from billing.ledger import Ledger  # noqa: E402
from billing.outbox import Outbox, RedisOutbox, SqlOutbox  # noqa: E402
from billing.pricing import Price, rate  # noqa: E402
from billing.tables import metadata, outbox  # noqa: E402
from gateway.db import make_engine, upgrade  # noqa: E402

FLUSH_TARGET = 5000.0
APPEND_TARGET_MS = 0.2
BATCH = 1000
T0 = datetime(2026, 3, 1, tzinfo=UTC)
#: Persistence as a production Redis runs it.
AOF = ("--appendonly", "yes", "--appendfsync", "everysec")


def make_events(n: int, price: Price, prefix: str) -> list[UsageEvent]:
    """``n`` events of 100 tenants with 3 keys each, over 3 days, priced with ``price``."""
    made = []
    for i in range(n):
        prompt, cached, completion = 200 + i % 800, (i % 4) * 50, 20 + i % 300
        made.append(
            UsageEvent(
                id=f"{prefix}_{i:09d}",
                occurred_at=T0 + timedelta(seconds=i * 5),
                tenant_id=f"ten_{i % 100:04d}",
                key_id=f"key_{i % 300:04d}",
                model=price.model,
                operation="chat",
                prompt_tokens=prompt,
                cached_tokens=cached,
                completion_tokens=completion,
                latency_ms=120.5,
                ttft_ms=20.25,
                gpu_ms=80.0,
                cost_usd=rate(price, prompt, cached, completion),
                price_id=price.id,
            )
        )
    return made


def empty(engine: Engine) -> None:
    with engine.begin() as connection:
        for table in metadata.sorted_tables:
            if table.name != "price":
                connection.execute(delete(table))


async def fill(box: Outbox, engine: Engine, events: list[UsageEvent]) -> None:
    """Puts ``events`` in the outbox in bulk (how they got there is not what is measured)."""
    if isinstance(box, RedisOutbox):
        # The benchmark fills the stream directly, in bulk.
        client = box._client
        for start in range(0, len(events), 5000):
            async with client.pipeline(transaction=False) as pipe:
                for event in events[start : start + 5000]:
                    pipe.xadd("tg:usage", {b"e": encode_event(event)})
                await pipe.execute()
        return
    rows = [
        {"event_id": e.id, "payload": encode_event(e), "created_at": datetime.now(UTC)}
        for e in events
    ]
    with engine.begin() as connection:
        for start in range(0, len(rows), 10_000):
            connection.execute(insert(outbox), rows[start : start + 10_000])


async def flush_rate(kind: str, engine: Engine, url: str, events: list[UsageEvent]) -> float:
    empty(engine)
    client = None
    box: Outbox
    if kind == "redis":
        client = redis.asyncio.Redis.from_url(url)
        await client.flushdb()
        box = RedisOutbox(client)
    else:
        box = SqlOutbox(engine)
    await fill(box, engine, events)
    ledger = Ledger(engine)
    flusher = Flusher(box, ledger, batch=BATCH, interval_s=0.01)
    started = time.perf_counter()
    flusher.start()
    while flusher.stats.events < len(events):
        if flusher.stats.errors:
            raise RuntimeError(f"the flusher failed {flusher.stats.errors} times")
        await asyncio.sleep(0.002)
    elapsed = time.perf_counter() - started
    await flusher.stop()
    await box.close()
    if client is not None:
        await client.aclose()
    if await ledger.count_events() != len(events):
        raise RuntimeError("the ledger does not hold every event once")
    return len(events) / elapsed


async def append_latency(box: Outbox, events: list[UsageEvent], warmup: int = 200) -> list[float]:
    for event in events[:warmup]:
        await box.append(event)
    timings = []
    for event in events[warmup:]:
        started = time.perf_counter()
        await box.append(event)
        timings.append(time.perf_counter() - started)
    return timings


def latency_line(name: str, timings: list[float]) -> None:
    p50, p99 = percentile(timings, 0.5) * 1e3, percentile(timings, 0.99) * 1e3
    print(
        f"  {name:<40} p50 {p50:7.3f} ms   p99 {p99:7.3f} ms   "
        f"p50/target {p50 / APPEND_TARGET_MS:5.2f}"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--appends", type=int, default=5000)
    args = parser.parse_args()

    with postgres_url() as pg_url, redis_url(*AOF) as r_url:
        engine = make_engine(pg_url)
        try:
            ledger = Ledger(engine)
            price = await ledger.set_price(
                "demo-chat", Decimal("0.15"), Decimal("0.075"), Decimal("0.6"), T0
            )
            print(
                f"1. Flusher into PostgreSQL: {args.events} events, batch {BATCH}, "
                f"median of {args.runs} runs (target >= {FLUSH_TARGET:,.0f} events/s)"
            )
            for kind in ("redis", "sql"):
                rates = []
                for run in range(args.runs):
                    events = make_events(args.events, price, f"{kind}{run}")
                    rates.append(await flush_rate(kind, engine, r_url, events))
                median = statistics.median(rates)
                runs = ", ".join(f"{r:,.0f}" for r in rates)
                print(
                    f"  from the {kind + ' outbox':<12} {median:10,.0f} events/s   "
                    f"x{median / FLUSH_TARGET:.2f} the target   (runs: {runs})"
                )

            print(
                f"2. Append latency, {args.appends} sequential appends "
                f"(target p50 <= {APPEND_TARGET_MS} ms)"
            )
            n = args.appends + 200
            with tempfile.TemporaryDirectory() as folder:
                sqlite_url = f"sqlite:///{folder}/bench.db"
                upgrade(sqlite_url)
                sqlite_engine = make_engine(sqlite_url)
                sqlite_ledger = Ledger(sqlite_engine)
                await sqlite_ledger.set_price(
                    price.model,
                    price.input_per_mtok,
                    price.cached_input_per_mtok,
                    price.output_per_mtok,
                    price.effective_from,
                )
                box: Outbox = SqlOutbox(sqlite_engine)
                latency_line(
                    "SqlOutbox, SQLite file", await append_latency(box, make_events(n, price, "a"))
                )
                flusher = Flusher(box, sqlite_ledger, batch=BATCH, interval_s=0.2)
                flusher.start()
                timings = await append_latency(box, make_events(n, price, "b"))
                await flusher.stop()
                latency_line("SqlOutbox, SQLite file, flusher draining", timings)
                await box.close()
                sqlite_engine.dispose()

            empty(engine)
            box = SqlOutbox(engine)
            latency_line(
                "SqlOutbox, PostgreSQL", await append_latency(box, make_events(n, price, "c"))
            )
            await box.close()

            client = redis.asyncio.Redis.from_url(r_url)
            await client.flushdb()
            box = RedisOutbox(client, owns_client=True)
            latency_line("RedisOutbox", await append_latency(box, make_events(n, price, "d")))
            await box.close()
        finally:
            engine.dispose()


if __name__ == "__main__":
    asyncio.run(main())
