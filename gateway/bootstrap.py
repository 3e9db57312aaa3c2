"""First start of the embedded default: a ``demo`` tenant and key, prices for the demo
models, and an admin token."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

from billing.ledger import Ledger
from gateway.credentials import make_admin_token
from gateway.db import AccountStore

__all__ = ["DEMO_PRICES", "DEMO_RPM", "bootstrap_demo", "local_admin_token", "seed_demo_prices"]

#: The demo tenant's limits: generous for trying things out, finite so quotas show.
DEMO_RPM = 600
DEMO_TPM = 1_000_000
#: USD per million tokens (input, cached input, output) of the demo models, so that the
#: receipts a first run shows are real figures. Operators set their own with
#: ``PUT /admin/v1/prices/{model}``.
DEMO_PRICES = {
    "demo-chat": (Decimal("0.15"), Decimal("0.075"), Decimal("0.60")),
    "minilm": (Decimal("0.02"), Decimal("0.02"), Decimal("0")),
}


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


async def seed_demo_prices(ledger: Ledger, models: set[str]) -> list[str]:
    """Give each demo model in ``models`` its demo price, unless it has a price already.

    Returns:
        The models priced now.
    """
    priced = {price.model for price in await ledger.prices()}
    seeded = []
    for model, (uncached, cached, output) in DEMO_PRICES.items():
        if model in models and model not in priced:
            await ledger.set_price(
                model,
                input_per_mtok=uncached,
                cached_input_per_mtok=cached,
                output_per_mtok=output,
                effective_from=datetime(2026, 1, 1, tzinfo=UTC),
            )
            seeded.append(model)
    return seeded
