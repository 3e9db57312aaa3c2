"""The embedded default: SQLite under the data dir, the in-process quota store, and the
demo tenant that ``make run`` bootstraps. No engines: this is about accounts and keys."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from litestar.testing import AsyncTestClient

from gateway.app import create_app
from gateway.cli import _demo
from gateway.settings import Settings
from serving import EngineHost
from serving.catalog import Catalog


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=str(tmp_path), log_level="WARNING")


def test_demo_bootstrap_once(settings: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    first = _demo(settings)
    out = capsys.readouterr().out
    key = (settings.data_path / "demo-key").read_text().strip()
    assert key.startswith("tg_")
    assert f"API key: {key}" in out
    assert first.admin_token
    assert first.admin_token == (settings.data_path / "admin-token").read_text().strip()
    for name in ("demo-key", "admin-token", "secret"):
        mode = (settings.data_path / name).stat().st_mode
        assert stat.S_IMODE(mode) == 0o600, name
    again = _demo(settings)
    assert again.admin_token == first.admin_token
    assert f"Demo API key: {key}" in capsys.readouterr().out
    db = (settings.data_path / "tollgate.db").read_bytes()
    assert key.encode() not in db  # only its HMAC is stored


@pytest.fixture
async def embedded(settings: Settings) -> AsyncIterator[tuple[AsyncTestClient, Settings]]:
    settings = await asyncio.to_thread(_demo, settings)  # the CLI's own loop, as `make run`
    app = create_app(settings, host=EngineHost(Catalog([])))
    async with AsyncTestClient(app) as client:
        yield client, settings


async def test_demo_key_and_admin_on_sqlite(
    embedded: tuple[AsyncTestClient, Settings],
) -> None:
    client, settings = embedded
    key = (settings.data_path / "demo-key").read_text().strip()
    models = await client.get("/v1/models", headers={"authorization": f"Bearer {key}"})
    assert models.status_code == 200, models.text
    assert (await client.get("/v1/models")).status_code == 401
    admin = {"authorization": f"Bearer {settings.admin_token}"}
    tenants = (await client.get("/admin/v1/tenants", headers=admin)).json()["data"]
    assert [t["name"] for t in tenants] == ["demo"]
    quota = (await client.get(f"/admin/v1/tenants/{tenants[0]['id']}/quota", headers=admin)).json()
    assert quota["rpm"] == 600
    as_demo = await client.get("/admin/v1/tenants", headers={"authorization": f"Bearer {key}"})
    assert as_demo.status_code == 403


def test_start_up_refuses_a_weak_admin_token(tmp_path: Path) -> None:
    from gateway.settings import SettingsError

    for token in (None, "changeme"):
        with pytest.raises(SettingsError):
            create_app(
                Settings(data_dir=str(tmp_path), admin_token=token),
                host=EngineHost(Catalog([])),
            )


def test_settings_never_show_secrets() -> None:
    settings = Settings(
        admin_token="tga_supersecretvalue123",  # noqa: S106 (a made-up value to look for)
        secret="s3cr3t-s3cr3t-s3cr3t",  # noqa: S106 (as above)
        database_url="postgresql://app:hunter2@db:5432/tollgate",
    )
    shown = repr(settings) + str(settings)
    for secret in ("tga_supersecretvalue123", "s3cr3t-s3cr3t-s3cr3t", "hunter2"):
        assert secret not in shown


def test_serve_without_an_admin_token_exits_with_a_message(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLGATE_")}
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--data-dir", str(tmp_path), "--port", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2
    assert "TOLLGATE_ADMIN_TOKEN is required" in result.stderr


def test_billing_cli_invoice_and_export(
    settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from datetime import UTC, datetime
    from decimal import Decimal

    from billing.events import UsageEvent
    from billing.ledger import Ledger
    from billing.pricing import rate
    from gateway.cli import main
    from gateway.db import AccountStore, make_engine

    _demo(settings)
    capsys.readouterr()

    async def seed() -> tuple[str, Decimal]:
        engine = make_engine(settings.database)
        accounts, ledger = AccountStore(engine), Ledger(engine)
        tenant = (await accounts.list_tenants())[0]
        price = await ledger.set_price(
            "demo-chat",
            input_per_mtok=Decimal("2"),
            cached_input_per_mtok=Decimal("1"),
            output_per_mtok=Decimal("8"),
            effective_from=datetime(2026, 1, 1, tzinfo=UTC),
        )
        events = [
            UsageEvent(
                id=f"req_cli{i}",
                occurred_at=datetime(2026, 11, 2 + i, tzinfo=UTC),
                tenant_id=tenant.id,
                key_id=None,
                model="demo-chat",
                operation="chat",
                prompt_tokens=1000 + i,
                completion_tokens=333 * i,
                cost_usd=rate(price, 1000 + i, 0, 333 * i),
                price_id=price.id,
            )
            for i in range(3)
        ]
        await ledger.record(events)
        await accounts.close()
        return tenant.id, sum((e.cost_usd for e in events), Decimal(0))

    tenant_id, total = asyncio.run(seed())
    data_dir = ["--data-dir", str(settings.data_path)]
    assert (
        main(["billing", "invoice", "--tenant", tenant_id, "--period", "2026-11", *data_dir]) == 0
    )
    invoice = json.loads(capsys.readouterr().out)
    assert Decimal(invoice["total_usd"]) == total.quantize(Decimal("0.01"))
    out = tmp_path / "focus.csv"
    args = ["--start", "2026-11-01", "--end", "2026-12-01", "--format", "focus"]
    assert main(["billing", "export", *args, "--output", str(out), *data_dir]) == 0
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert sum(Decimal(r["BilledCost"]) for r in rows) == total
    assert (
        main(["billing", "invoice", "--tenant", "ten_nope", "--period", "2026-11", *data_dir]) == 2
    )


def test_db_upgrade_command_migrates_the_embedded_database(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLGATE_")}
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "db", "upgrade", "--data-dir", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "database at head" in result.stdout
    from gateway.db import current
    from gateway.db.migrate import head

    assert current(f"sqlite:///{tmp_path / 'tollgate.db'}") == head()
