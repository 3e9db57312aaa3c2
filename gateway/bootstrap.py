"""First start of the embedded default: a ``demo`` tenant and key, and an admin token."""

from __future__ import annotations

import os
from pathlib import Path

from gateway.credentials import make_admin_token
from gateway.db import AccountStore

__all__ = ["DEMO_RPM", "bootstrap_demo", "local_admin_token"]

#: The demo tenant's limits: generous for trying things out, finite so quotas show.
DEMO_RPM = 600
DEMO_TPM = 1_000_000


def _write_private(path: Path, value: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")


def local_admin_token(data_dir: Path) -> str:
    """The admin token kept under the data dir for local runs, made on first use (mode 0600)."""
    path = data_dir / "admin-token"
    if path.exists():
        return path.read_text().strip()
    token = make_admin_token()
    _write_private(path, token)
    return token


async def bootstrap_demo(accounts: AccountStore, secret: bytes, data_dir: Path) -> str | None:
    """On an empty database, make the ``demo`` tenant with one key and a quota.

    The key is kept in ``<data_dir>/demo-key`` (mode 0600) so that local runs can print it
    again; the database holds only its HMAC. Returns the key, or ``None`` when the
    database already has tenants (then the file, if any, still holds the demo key).
    """
    if not await accounts.is_empty():
        return None
    tenant = await accounts.create_tenant("demo")
    await accounts.set_quota(tenant.id, None, rpm=DEMO_RPM, tpm=DEMO_TPM)
    _, key = await accounts.create_key(tenant.id, name="demo", secret=secret)
    _write_private(data_dir / "demo-key", key)
    return key
