"""Settings come from TOLLGATE_* variables and refuse what does not parse."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.settings import Settings, SettingsError


def test_defaults_and_environment() -> None:
    assert Settings.from_env({}).port == 8000
    settings = Settings.from_env(
        {"TOLLGATE_PORT": "9001", "TOLLGATE_DATA_DIR": "/srv/tg", "TOLLGATE_MAX_N": "4"}
    )
    assert settings.port == 9001
    assert settings.data_path == Path("/srv/tg")
    assert settings.max_n == 4


def test_overrides_win_over_environment() -> None:
    settings = Settings.from_env({"TOLLGATE_PORT": "9001"}, port=9100, host=None)
    assert settings.port == 9100
    assert settings.host == "127.0.0.1"


def test_bad_values_name_the_setting() -> None:
    with pytest.raises(SettingsError, match="port"):
        Settings.from_env({"TOLLGATE_PORT": "eighty"})


def test_outbox_claim_idle_time_is_positive_seconds() -> None:
    assert Settings.from_env({}).outbox_claim_idle_s == 30.0
    assert Settings.from_env({"TOLLGATE_OUTBOX_CLAIM_IDLE_S": "2.5"}).outbox_claim_idle_s == 2.5
    with pytest.raises(SettingsError, match="outbox_claim_idle_s"):
        Settings.from_env({"TOLLGATE_OUTBOX_CLAIM_IDLE_S": "0"})
