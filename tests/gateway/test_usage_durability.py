"""Usage events survive an outbox that fails: they go to the local spool, or are held and
retried, and an answer claims a receipt only for an event that was written somewhere.

On the embedded default (SQLite outbox in the gateway's database), the outbox table is made
to fail by dropping it (from outside, as a broken disk or a botched migration would), and
the spool by a folder standing where its file would go.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from billing.spool import Spool, SpoolError
from tests.conftest import Deployment, Gateway, start_gateway, stop_gateway, wait_ready
from tests.support.catalogs import CHAT_ONLY

BODY = {"model": "demo-chat", "prompt": "durable", "max_tokens": 3}


def test_spool_keeps_records_until_removed(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool" / "spool.db")
    assert spool.count() == 0
    spool.put("event", "req_a", b"one")
    spool.put("event", "req_b", b"two")
    spool.put("event", "req_a", b"three")  # the same key keeps the last payload
    spool.put("settlement", "req_a", b"s")
    assert sorted(spool.take("event")) == [("req_a", b"three"), ("req_b", b"two")]
    spool.close()
    again = Spool(tmp_path / "spool" / "spool.db")  # what a restarted process finds
    assert again.count("event") == 2
    again.remove("event", ["req_a", "req_b"])
    assert again.count() == 1
    assert again.take("settlement") == [("req_a", b"s")]
    blocked = tmp_path / "blocked.db"
    blocked.mkdir()
    with pytest.raises(SpoolError):
        Spool(blocked).put("event", "req_c", b"x")


async def test_an_event_the_ledger_would_refuse_is_dead_lettered_not_dropped(
    tmp_path: Path,
) -> None:
    from datetime import UTC, datetime

    from billing.events import UsageEvent
    from billing.ledger import Ledger
    from billing.outbox import SqlOutbox
    from gateway.db import make_engine, upgrade
    from gateway.usage import UsageRecorder

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    upgrade(url)
    engine = make_engine(url)
    ledger = Ledger(engine)
    recorder = UsageRecorder(SqlOutbox(engine), ledger, spool=Spool(tmp_path / "spool.db"))
    await recorder.start()
    try:
        bad = UsageEvent(
            id="req_bad",
            occurred_at=datetime.now(UTC),
            tenant_id="ten_1",
            key_id=None,
            model="m" * 300,  # longer than the ledger stores
            operation="chat",
        )
        assert await recorder.record(bad) is False  # no receipt for it
        (letter,) = await ledger.dead_letters()
        assert letter.event_id == "req_bad"
        assert b"m" * 300 in letter.payload
        assert "model" in letter.error
    finally:
        await recorder.close()
        engine.dispose()


@pytest.fixture
def embedded(
    deployment: Deployment, data_dir: Path, tmp_path: Path
) -> Iterator[tuple[Gateway, Path, str]]:
    """An embedded-default gateway on a data dir of its own: (gateway, data dir, token)."""
    own = tmp_path / "data"
    own.mkdir()
    (own / "models").symlink_to((data_dir / "models").resolve())
    token = "tga_" + secrets.token_urlsafe(24)
    deployment.secrets.append(token)
    catalog = tmp_path / "chat-only.toml"
    catalog.write_text(CHAT_ONLY)
    gw = start_gateway(
        deployment,
        tmp_path / "gateway.log",
        "--models",
        str(catalog),
        TOLLGATE_DATA_DIR=str(own),
        TOLLGATE_ADMIN_TOKEN=token,
        TOLLGATE_DATABASE_URL="",
        TOLLGATE_REDIS_URL="",
        TOLLGATE_SECRET="",
    )
    try:
        wait_ready(gw)
        yield gw, own, token
    finally:
        stop_gateway(gw)


def outbox_ddl(database: Path) -> list[str]:
    with sqlite3.connect(database) as db:
        rows = db.execute(
            "SELECT sql FROM sqlite_master WHERE tbl_name = 'outbox' AND sql IS NOT NULL"
        ).fetchall()
    return [str(sql) for (sql,) in rows]


def run_sql(database: Path, *statements: str) -> None:
    db = sqlite3.connect(database, timeout=30)
    try:
        for statement in statements:
            db.execute(statement)
        db.commit()
    finally:
        db.close()


def export(gw: Gateway, token: str, tenant: str) -> dict[str, dict[str, Any]]:
    answer = httpx.get(
        gw.base_url + "/admin/v1/billing/export",
        params={"tenant": tenant, "format": "jsonl", "start": "2000-01-01"},
        headers={"authorization": f"Bearer {token}"},
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    return {row["id"]: row for row in map(json.loads, answer.text.splitlines()) if row}


def test_a_failing_outbox_spools_events_and_receipts_stay_honest(
    embedded: tuple[Gateway, Path, str],
) -> None:
    gw, data, token = embedded
    admin = {"authorization": f"Bearer {token}"}
    with httpx.Client(base_url=gw.base_url, timeout=60) as http:
        assert http.put(
            "/admin/v1/prices/demo-chat",
            json={"input_per_mtok": "1", "output_per_mtok": "2"},
            headers=admin,
        ).is_success
        tenant = http.post("/admin/v1/tenants", json={"name": "t"}, headers=admin).json()["id"]
        key = http.post(
            f"/admin/v1/tenants/{tenant}/keys", json={"name": "k"}, headers=admin
        ).json()["value"]
        http.headers["authorization"] = f"Bearer {key}"
        healthy = http.post("/v1/completions", json=BODY)
        assert "x-tollgate-cost-usd" in healthy.headers
        deadline = time.monotonic() + 30
        while healthy.headers["x-request-id"] not in export(gw, token, tenant):
            assert time.monotonic() < deadline, "the first event never reached the ledger"
            time.sleep(0.2)  # the outbox is empty before its table goes
        database = data / "tollgate.db"
        ddl = outbox_ddl(database)
        assert ddl
        run_sql(database, "DROP TABLE outbox")
        # The outbox fails: the event goes to the spool, which is durable: a receipt.
        spooled = http.post("/v1/completions", json=BODY)
        assert spooled.status_code == 200
        assert "x-tollgate-cost-usd" in spooled.headers
        deadline = time.monotonic() + 10
        while Spool(data / "spool.db").count("event") < 1:
            assert time.monotonic() < deadline, "nothing reached the spool"
            time.sleep(0.1)
        # The spool fails too: the answer is served, but claims no receipt.
        spool_file = data / "spool.db"
        spool_file.rename(data / "kept-spool.db")
        spool_file.mkdir()
        unwritten = http.post("/v1/completions", json=BODY)
        assert unwritten.status_code == 200
        assert "x-tollgate-cost-usd" not in unwritten.headers
        streamed = http.post(
            "/v1/completions",
            json={**BODY, "stream": True, "stream_options": {"include_usage": True}},
        )
        assert streamed.status_code == 200
        assert '"cost_usd"' not in streamed.text
        assert streamed.text.rstrip().endswith("data: [DONE]")
        # Everything comes back: the outbox and the spool the events were put in.
        spool_file.rmdir()
        (data / "kept-spool.db").rename(spool_file)
        run_sql(database, *ddl)
    ids = {r.headers["x-request-id"] for r in (healthy, spooled, unwritten, streamed)}
    deadline = time.monotonic() + 60
    while True:
        rows = export(gw, token, tenant)
        if ids <= set(rows):
            break
        assert time.monotonic() < deadline, f"{len(ids - set(rows))} events never arrived"
        time.sleep(0.5)
    assert len(rows) == 4
    assert {r["status"] for r in rows.values()} == {"ok"}
    assert "could not be spooled" in gw.log()
