from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import Engine, event, text
from sqlalchemy.exc import IntegrityError

from gateway.db import (
    AccountError,
    AccountStore,
    ApiKey,
    InvalidValue,
    NotFound,
    QuotaPolicy,
    Tenant,
    upgrade,
)
from gateway.keys import is_well_formed, key_digest, key_hint


@contextmanager
def statements(engine: Engine) -> Iterator[list[str]]:
    """The SQL statements the engine runs inside the block, transaction control left out."""
    seen: list[str] = []

    def record(*args: Any) -> None:
        statement = str(args[2]).strip()
        if statement.split()[0].upper() not in {"BEGIN", "COMMIT", "ROLLBACK"}:
            seen.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)


def row_of(engine: Engine, table: str, row_id: object) -> dict[str, Any]:
    with engine.connect() as connection:
        row = connection.execute(
            text(f"SELECT * FROM {table} WHERE id = :id"),  # noqa: S608  # fixed table names
            {"id": row_id},
        ).one()
    return dict(row._mapping)


@pytest.fixture
async def empty_store(new_database: Callable[[], str]) -> AsyncIterator[AccountStore]:
    """A store over a database of its own, migrated and empty."""
    url = new_database()
    upgrade(url)
    accounts = AccountStore.from_url(url)
    yield accounts
    await accounts.close()


def test_errors_form_a_tree() -> None:
    assert issubclass(NotFound, AccountError)
    assert issubclass(InvalidValue, AccountError)
    assert issubclass(InvalidValue, ValueError)


async def test_tenant_lifecycle(store: AccountStore) -> None:
    tenant = await store.create_tenant("  Acme Corp ")
    assert tenant.name == "Acme Corp"
    assert tenant.id.startswith("ten_")
    assert len(tenant.id) == 20
    assert tenant.deleted_at is None
    assert tenant.created_at.tzinfo is UTC
    assert datetime.now(UTC) - tenant.created_at < timedelta(minutes=1)

    fetched = await store.get_tenant(tenant.id)
    assert isinstance(fetched, Tenant)
    assert fetched.model_dump() == tenant.model_dump()
    assert fetched.created_at.tzinfo is UTC

    assert tenant.id in {t.id for t in await store.list_tenants()}
    assert [t.id for t in await store.list_tenants(tenant_id=tenant.id)] == [tenant.id]
    assert await store.list_tenants(tenant_id="ten_missing") == []

    renamed = await store.rename_tenant(tenant.id, "Acme Inc")
    assert renamed.name == "Acme Inc"
    assert (await store.get_tenant(tenant.id)).name == "Acme Inc"


async def test_tenant_names_are_checked(store: AccountStore) -> None:
    for name in ("", "   ", "x" * 201):
        with pytest.raises(InvalidValue):
            await store.create_tenant(name)
    assert (await store.create_tenant("x" * 200)).name == "x" * 200
    tenant = await store.create_tenant("named")
    with pytest.raises(InvalidValue):
        await store.rename_tenant(tenant.id, "")


async def test_unknown_tenants_are_not_found(store: AccountStore, secret: bytes) -> None:
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: store.get_tenant("ten_missing"),
        lambda: store.rename_tenant("ten_missing", "x"),
        lambda: store.delete_tenant("ten_missing"),
        lambda: store.list_keys("ten_missing"),
        lambda: store.create_key("ten_missing", name="k", secret=secret),
        lambda: store.set_quota("ten_missing", None, rpm=1),
    ]
    for call in calls:
        with pytest.raises(NotFound):
            await call()


async def test_is_empty(empty_store: AccountStore) -> None:
    assert await empty_store.is_empty()
    tenant = await empty_store.create_tenant("first")
    assert not await empty_store.is_empty()
    await empty_store.delete_tenant(tenant.id)
    assert not await empty_store.is_empty()


async def test_key_is_returned_once_and_only_its_digest_is_stored(
    store: AccountStore, secret: bytes
) -> None:
    tenant = await store.create_tenant("keys")
    key, plaintext = await store.create_key(tenant.id, name="ci", secret=secret)

    assert is_well_formed(plaintext)
    assert isinstance(key, ApiKey)
    assert key.id.startswith("key_")
    assert len(key.id) == 20
    assert key.tenant_id == tenant.id
    assert key.role == "user"
    assert key.models is None
    assert key.digest == key_digest(plaintext, secret)
    assert (key.prefix, key.last4) == key_hint(plaintext)
    assert key.created_at.tzinfo is UTC

    row = row_of(store.engine, "api_key", key.id)
    stored = " ".join(str(value) for value in row.values())
    assert plaintext not in stored
    assert plaintext[3:-6] not in stored
    assert plaintext not in str((await store.get_key(key.id)).model_dump())
    assert row["digest"] == key.digest
    assert row["models"] is None  # SQL NULL, not JSON null: every model

    listed = await store.list_keys(tenant.id)
    assert [k.id for k in listed] == [key.id]
    assert (await store.get_key(key.id)).model_dump() == key.model_dump()


async def test_key_options(store: AccountStore, secret: bytes) -> None:
    tenant = await store.create_tenant("options")
    expiry = datetime(2030, 1, 2, 3, 4, 5, 600000, tzinfo=timezone(timedelta(hours=2)))
    key, _ = await store.create_key(
        tenant.id,
        name="admin key",
        role="admin",
        models=["demo-chat", "minilm", "demo-chat"],
        expires_at=expiry,
        secret=secret,
    )
    fetched = await store.get_key(key.id)
    for found in (key, fetched):
        assert found.role == "admin"
        assert found.models == ["demo-chat", "minilm"]
        assert found.expires_at == expiry
        assert found.expires_at is not None
        assert found.expires_at.tzinfo is UTC


@pytest.mark.parametrize(
    "options",
    [
        {"role": "root"},
        {"models": []},
        {"models": "demo-chat"},
        {"models": [""]},
        {"expires_at": datetime(2030, 1, 1)},  # naive, on purpose
        {"name": ""},
        {"secret": b""},
    ],
)
async def test_key_options_are_checked(
    store: AccountStore, secret: bytes, options: dict[str, Any]
) -> None:
    tenant = await store.create_tenant("checked")
    arguments: dict[str, Any] = {"name": "k", "secret": secret, **options}
    with pytest.raises(InvalidValue):
        await store.create_key(tenant.id, **arguments)
    assert await store.list_keys(tenant.id) == []


async def test_find_key_joins_its_tenant_in_one_query(store: AccountStore, secret: bytes) -> None:
    tenant = await store.create_tenant("finder")
    key, plaintext = await store.create_key(tenant.id, name="k", secret=secret)
    with statements(store.engine) as seen:
        found = await store.find_key(key_digest(plaintext, secret))
    assert len(seen) == 1
    assert "JOIN" in seen[0].upper()
    assert found is not None
    found_key, found_tenant = found
    assert found_key.id == key.id
    assert found_tenant.id == tenant.id
    assert found_tenant.name == "finder"
    assert await store.find_key(key_digest(plaintext, b"another secret")) is None


async def test_revoked_and_expired_keys_are_still_found(store: AccountStore, secret: bytes) -> None:
    tenant = await store.create_tenant("revoker")
    past = datetime.now(UTC) - timedelta(days=1)
    expired, expired_plaintext = await store.create_key(
        tenant.id, name="old", expires_at=past, secret=secret
    )
    key, plaintext = await store.create_key(tenant.id, name="k", secret=secret)

    revoked = await store.revoke_key(key.id)
    assert revoked.revoked_at is not None
    assert revoked.revoked_at.tzinfo is UTC
    again = await store.revoke_key(key.id)
    assert again.revoked_at == revoked.revoked_at
    assert (await store.get_key(key.id)).revoked_at == revoked.revoked_at

    found = await store.find_key(key_digest(plaintext, secret))
    assert found is not None
    assert found[0].revoked_at == revoked.revoked_at
    found = await store.find_key(key_digest(expired_plaintext, secret))
    assert found is not None
    assert found[0].id == expired.id
    assert found[0].expires_at == past
    assert found[0].revoked_at is None

    with pytest.raises(NotFound):
        await store.revoke_key("key_missing")
    with pytest.raises(NotFound):
        await store.get_key("key_missing")


async def test_delete_is_soft_hides_the_tenant_and_revokes_its_keys(
    store: AccountStore, secret: bytes
) -> None:
    tenant = await store.create_tenant("leaver")
    other = await store.create_tenant("stayer")
    early, _ = await store.create_key(tenant.id, name="early", secret=secret)
    early = await store.revoke_key(early.id)
    key, plaintext = await store.create_key(tenant.id, name="k", secret=secret)
    others_key, _ = await store.create_key(other.id, name="k", secret=secret)
    await store.set_quota(tenant.id, None, rpm=5)

    await store.delete_tenant(tenant.id)

    with pytest.raises(NotFound):
        await store.get_tenant(tenant.id)
    assert tenant.id not in {t.id for t in await store.list_tenants()}
    assert await store.list_tenants(tenant_id=tenant.id) == []
    with pytest.raises(NotFound):
        await store.delete_tenant(tenant.id)
    with pytest.raises(NotFound):
        await store.create_key(tenant.id, name="late", secret=secret)

    revoked = await store.get_key(key.id)
    assert revoked.revoked_at is not None
    assert (await store.get_key(early.id)).revoked_at == early.revoked_at
    assert (await store.get_key(others_key.id)).revoked_at is None

    found = await store.find_key(key_digest(plaintext, secret))
    assert found is not None
    assert found[1].deleted_at is not None
    assert found[1].deleted_at.tzinfo is UTC

    # The rows stay for billing.
    assert row_of(store.engine, "tenant", tenant.id)["name"] == "leaver"
    assert (await store.get_quota(tenant.id)) is not None


async def test_quota_upsert_and_exact_money(store: AccountStore, secret: bytes) -> None:
    tenant = await store.create_tenant("quotas")
    assert await store.get_quota(tenant.id) is None

    policy = await store.set_quota(tenant.id, None, rpm=60, monthly_spend_usd=Decimal("12.345678"))
    assert isinstance(policy, QuotaPolicy)
    assert policy.key_id is None
    assert policy.rpm == 60
    assert policy.tpm is None
    assert policy.monthly_spend_usd == Decimal("12.345678")
    assert str(policy.monthly_spend_usd) == "12.345678"
    assert policy.updated_at.tzinfo is UTC

    stored = await store.get_quota(tenant.id)
    assert stored is not None
    assert stored.model_dump() == policy.model_dump()
    assert isinstance(stored.monthly_spend_usd, Decimal)
    assert str(stored.monthly_spend_usd) == "12.345678"

    updated = await store.set_quota(tenant.id, None, tpm=10**12, monthly_tokens=5 * 10**12)
    assert updated.id == policy.id
    assert (updated.rpm, updated.tpm, updated.monthly_tokens) == (60, 10**12, 5 * 10**12)
    assert updated.monthly_spend_usd == Decimal("12.345678")
    assert updated.updated_at >= policy.updated_at

    cleared = await store.set_quota(
        tenant.id, None, rpm=None, monthly_spend_usd=Decimal("999999999999.999999")
    )
    assert cleared.rpm is None
    assert cleared.tpm == 10**12
    assert str(cleared.monthly_spend_usd) == "999999999999.999999"
    stored = await store.get_quota(tenant.id)
    assert stored is not None
    assert str(stored.monthly_spend_usd) == "999999999999.999999"
    assert (
        str(
            (await store.set_quota(tenant.id, None, monthly_spend_usd=Decimal(5))).monthly_spend_usd
        )
        == "5.000000"
    )


async def test_key_level_quota_and_quotas_for(store: AccountStore, secret: bytes) -> None:
    tenant = await store.create_tenant("layers")
    key, _ = await store.create_key(tenant.id, name="limited", secret=secret)
    free, _ = await store.create_key(tenant.id, name="free", secret=secret)

    assert await store.quotas_for(tenant.id, key.id) == (None, None)
    own = await store.set_quota(tenant.id, None, rpm=100, max_concurrency=8)
    keys = await store.set_quota(tenant.id, key.id, rpm=10, daily_tokens=1000)
    assert keys.id != own.id
    assert keys.key_id == key.id
    assert (await store.set_quota(tenant.id, key.id, rpm=20)).id == keys.id

    with statements(store.engine) as seen:
        tenant_policy, key_policy = await store.quotas_for(tenant.id, key.id)
    assert len(seen) == 1
    assert tenant_policy is not None
    assert key_policy is not None
    assert (tenant_policy.id, tenant_policy.rpm, tenant_policy.max_concurrency) == (own.id, 100, 8)
    assert (key_policy.id, key_policy.rpm, key_policy.daily_tokens) == (keys.id, 20, 1000)

    tenant_only = await store.quotas_for(tenant.id, free.id)
    assert tenant_only[0] is not None
    assert tenant_only[0].id == own.id
    assert tenant_only[1] is None
    assert (await store.quotas_for(tenant.id, None))[1] is None

    key_policy = await store.get_quota(tenant.id, key.id)
    assert key_policy is not None
    assert key_policy.id == keys.id
    assert await store.get_quota(tenant.id, free.id) is None

    other = await store.create_tenant("other")
    with pytest.raises(NotFound):
        await store.set_quota(other.id, key.id, rpm=1)
    with pytest.raises(NotFound):
        await store.set_quota(tenant.id, "key_missing", rpm=1)


@pytest.mark.parametrize(
    "fields",
    [
        {"rpm": -1},
        {"rpm": 1.5},
        {"rpm": True},
        {"rpm": "10"},
        {"rpm": 2**31},
        {"tpm": 2**63},
        {"burst": 5},
        {"monthly_spend_usd": 12.5},
        {"monthly_spend_usd": "12.5"},
        {"monthly_spend_usd": Decimal("0.0000001")},
        {"monthly_spend_usd": Decimal("-1")},
        {"monthly_spend_usd": Decimal("NaN")},
        {"monthly_spend_usd": Decimal("Infinity")},
        {"monthly_spend_usd": Decimal("1000000000000")},
        {"monthly_spend_usd": Decimal("1e40")},
    ],
)
async def test_quota_values_are_checked(store: AccountStore, fields: dict[str, Any]) -> None:
    tenant = await store.create_tenant("strict")
    with pytest.raises(InvalidValue):
        await store.set_quota(tenant.id, None, **fields)
    assert await store.get_quota(tenant.id) is None


async def test_one_tenant_level_policy_per_tenant(store: AccountStore, secret: bytes) -> None:
    tenant = await store.create_tenant("unique")
    key, _ = await store.create_key(tenant.id, name="k", secret=secret)
    await asyncio.gather(*(store.set_quota(tenant.id, None, rpm=n) for n in range(1, 9)))
    await asyncio.gather(*(store.set_quota(tenant.id, key.id, tpm=n) for n in range(1, 9)))

    insert = text(
        "INSERT INTO quota_policy (tenant_id, key_id, rpm, updated_at) "
        "VALUES (:tenant, :key, 1, CURRENT_TIMESTAMP)"
    )
    with store.engine.connect() as connection:
        count = connection.execute(
            text("SELECT count(*) FROM quota_policy WHERE tenant_id = :tenant"),
            {"tenant": tenant.id},
        ).scalar()
        assert count == 2
        for key_id in (None, key.id):
            with pytest.raises(IntegrityError):
                connection.execute(insert, {"tenant": tenant.id, "key": key_id})
            connection.rollback()


async def test_returned_objects_outlive_the_store(migrated_url: str, secret: bytes) -> None:
    accounts = AccountStore.from_url(migrated_url)
    tenant = await accounts.create_tenant("detached")
    key, _ = await accounts.create_key(tenant.id, name="k", models=["m"], secret=secret)
    policy = await accounts.set_quota(tenant.id, key.id, rpm=1)
    found = await accounts.find_key(key.digest)
    await accounts.close()
    assert found is not None
    assert (found[0].models, found[1].name) == (["m"], "detached")
    assert (tenant.name, key.models, policy.rpm, policy.updated_at.tzinfo) == (
        "detached",
        ["m"],
        1,
        UTC,
    )
