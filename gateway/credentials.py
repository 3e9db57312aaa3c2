"""The server's own secrets: the operator's admin token and the key-hashing secret."""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

from gateway.settings import Settings, SettingsError

__all__ = ["check_admin_token", "load_secret", "make_admin_token"]

#: Values that show up in tutorials, templates and default configs: never accepted.
_WELL_KNOWN = frozenset(
    {
        "admin",
        "administrator",
        "changeme",
        "change-me",
        "changethis",
        "default",
        "example",
        "letmein",
        "password",
        "root",
        "secret",
        "test",
        "token",
        "tollgate",
        "sk-admin",
        "your-admin-token",
    }
)
_MIN_LENGTH = 16


def check_admin_token(token: str | None) -> str:
    """Return the admin token, or refuse one that is missing, short or well known.

    Raises:
        SettingsError: naming ``TOLLGATE_ADMIN_TOKEN``, never echoing the value.
    """
    if not token or not token.strip():
        raise SettingsError(
            "TOLLGATE_ADMIN_TOKEN is required (a random string of at least "
            f"{_MIN_LENGTH} characters, e.g. `openssl rand -hex 24`)"
        )
    lowered = token.strip().lower()
    if lowered in _WELL_KNOWN or len(set(lowered)) < 4:
        raise SettingsError("TOLLGATE_ADMIN_TOKEN is a well-known value; choose a random one")
    if len(token) < _MIN_LENGTH:
        raise SettingsError(f"TOLLGATE_ADMIN_TOKEN must be at least {_MIN_LENGTH} characters")
    return token


def make_admin_token() -> str:
    return "tga_" + secrets.token_urlsafe(32)


def load_secret(settings: Settings) -> bytes:
    """The key-hashing secret: ``TOLLGATE_SECRET``, else one kept under the data dir.

    The file is made once with mode 0600; every process on this data dir then shares it.
    Replicas on different machines must set ``TOLLGATE_SECRET`` to one shared value.
    """
    if settings.secret:
        if len(settings.secret) < _MIN_LENGTH:
            raise SettingsError(f"TOLLGATE_SECRET must be at least {_MIN_LENGTH} characters")
        return settings.secret.encode()
    return _file_secret(settings.data_path / "secret", "TOLLGATE_SECRET").encode()


def _file_secret(path: Path, variable: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        # Another process may have just made it and not written it yet.
        for _ in range(50):
            value = path.read_text().strip()
            if value:
                break
            time.sleep(0.02)
        if len(value) < _MIN_LENGTH:
            raise SettingsError(f"{path} is too short to be a secret; set {variable}") from None
        return value
    value = secrets.token_urlsafe(48)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return value
