"""The embedded default: SQLite under the data dir, the in-process quota store, and the
demo tenant that ``make run`` bootstraps. No engines: this is about accounts and keys."""

from __future__ import annotations

import asyncio
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
