"""The admin API: who may call what, and what one tenant can see of another."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from gateway.credentials import check_admin_token
from gateway.settings import SettingsError
from tests.conftest import Gateway
from tests.support.admin import Admin, IssuedKey


def as_key(gateway: Gateway, key: str) -> httpx.Client:
    return httpx.Client(
        base_url=gateway.base_url + "/admin/v1",
        headers={"authorization": f"Bearer {key}"},
        timeout=30,
    )


def routes(tenant_id: str, key_id: str) -> list[tuple[str, str, dict[str, Any] | None]]:
    """Every admin route, with a body where it takes one."""
    return [
        ("POST", "/tenants", {"name": "x"}),
        ("GET", "/tenants", None),
        ("GET", f"/tenants/{tenant_id}", None),
        ("PATCH", f"/tenants/{tenant_id}", {"name": "renamed"}),
        ("DELETE", f"/tenants/{tenant_id}", None),
        ("POST", f"/tenants/{tenant_id}/keys", {"name": "k"}),
        ("GET", f"/tenants/{tenant_id}/keys", None),
        ("GET", f"/keys/{key_id}", None),
        ("DELETE", f"/keys/{key_id}", None),
        ("GET", f"/tenants/{tenant_id}/quota", None),
        ("PUT", f"/tenants/{tenant_id}/quota", {"rpm": 1}),
        ("GET", f"/keys/{key_id}/quota", None),
        ("PUT", f"/keys/{key_id}/quota", {"rpm": 1}),
    ]


@pytest.fixture(scope="module")
def victim(admin: Admin) -> IssuedKey:
    tenant = admin.tenant("victim", rpm=1000)
    return admin.issue(tenant, "victim-key")


def test_crud_as_operator(admin: Admin) -> None:
    created = admin.http.post("/tenants", json={"name": "acme"})
    assert created.status_code == 201
    tenant = created.json()
    assert tenant["name"] == "acme"
    assert tenant["id"].startswith("ten_")
    assert tenant["id"] in [t["id"] for t in admin.http.get("/tenants").json()["data"]]
    renamed = admin.http.patch(f"/tenants/{tenant['id']}", json={"name": "acme inc"})
    assert renamed.json()["name"] == "acme inc"

    key = admin.http.post(f"/tenants/{tenant['id']}/keys", json={"name": "ci"}).json()
    admin.secrets.append(key["value"])
    assert key["value"].startswith("tg_")
    assert key["redacted_value"] == f"{key['value'][:7]}...{key['value'][-4:]}"
    listed = admin.http.get(f"/tenants/{tenant['id']}/keys").json()["data"]
    assert [k["id"] for k in listed] == [key["id"]]
    assert "value" not in listed[0]  # shown once, at creation
    assert "value" not in admin.http.get(f"/keys/{key['id']}").json()

    quota = admin.http.put(
        f"/tenants/{tenant['id']}/quota",
        json={"rpm": 60, "monthly_spend_usd": "12.345678", "daily_tokens": None},
    ).json()
    assert quota["rpm"] == 60
    assert quota["monthly_spend_usd"] == "12.345678"
    assert quota["tpm"] is None
    assert admin.http.get(f"/tenants/{tenant['id']}/quota").json() == quota
    key_quota = admin.http.put(f"/keys/{key['id']}/quota", json={"max_concurrency": 2}).json()
    assert key_quota["key_id"] == key["id"]
    assert key_quota["max_concurrency"] == 2

    revoked = admin.http.delete(f"/keys/{key['id']}").json()
    assert revoked["revoked_at"] is not None
    assert admin.http.delete(f"/tenants/{tenant['id']}").status_code == 200
    assert admin.http.get(f"/tenants/{tenant['id']}").status_code == 404


def test_bodies_are_closed(admin: Admin) -> None:
    tenant = admin.tenant("closed-bodies")
    sneaky = admin.http.post(
        f"/tenants/{tenant}/keys", json={"name": "k", "tenant_id": "ten_other"}
    )
    assert sneaky.status_code == 400
    assert sneaky.json()["error"]["param"] == "tenant_id"
    assert admin.http.post("/tenants", json={"name": "n", "id": "ten_mine"}).status_code == 400
    negative = admin.http.put(f"/tenants/{tenant}/quota", json={"rpm": -1})
    assert negative.status_code == 400
    assert negative.json()["error"]["param"] == "rpm"
    money = admin.http.put(f"/tenants/{tenant}/quota", json={"monthly_spend_usd": "ten"})
    assert money.status_code == 400
    unknown_model = admin.http.post(f"/tenants/{tenant}/keys", json={"name": "k", "models": ["x"]})
    assert unknown_model.status_code == 400


def test_tenant_key_gets_403_on_every_admin_route(
    gateway: Gateway, admin: Admin, victim: IssuedKey
) -> None:
    tenant = admin.tenant("plain")
    plain = admin.issue(tenant, "plain-key")
    with as_key(gateway, plain.value) as http:
        for method, path, body in routes(tenant, plain.id) + routes(victim.tenant_id, victim.id):
            response = http.request(method, path, json=body)
            assert response.status_code == 403, (method, path, response.text)
            assert response.json()["error"]["type"] == "permission_error"


def test_other_tenants_objects_are_404(gateway: Gateway, admin: Admin, victim: IssuedKey) -> None:
    tenant = admin.tenant("curious")
    tenant_admin = admin.issue(tenant, "curious-admin", role="admin")
    ghost_tenant, ghost_key = "ten_0000000000000000", "key_0000000000000000"
    with as_key(gateway, tenant_admin.value) as http:
        for method, path, body in routes(victim.tenant_id, victim.id):
            if path == "/tenants":
                continue  # no id in the route
            response = http.request(method, path, json=body)
            assert response.status_code == 404, (method, path, response.text)
            ghost = path.replace(victim.tenant_id, ghost_tenant).replace(victim.id, ghost_key)
            missing = http.request(method, ghost, json=body)
            assert missing.status_code == 404
            # The same body as a missing id, but for the id itself.
            seen = response.text.replace(victim.tenant_id, ghost_tenant)
            assert seen.replace(victim.id, ghost_key) == missing.text
        listed = http.get("/tenants").json()["data"]
        assert [t["id"] for t in listed] == [tenant]
    # The victim is untouched.
    assert admin.http.get(f"/keys/{victim.id}").json()["revoked_at"] is None
    assert admin.http.get(f"/tenants/{victim.tenant_id}/quota").json()["rpm"] == 1000


def test_tenant_admin_manages_its_own_keys_only(gateway: Gateway, admin: Admin) -> None:
    tenant = admin.tenant("self-service")
    tenant_admin = admin.issue(tenant, "owner", role="admin")
    with as_key(gateway, tenant_admin.value) as http:
        created = http.post(f"/tenants/{tenant}/keys", json={"name": "app"})
        assert created.status_code == 201
        admin.secrets.append(created.json()["value"])
        key_id = created.json()["id"]
        assert http.put(f"/keys/{key_id}/quota", json={"rpm": 5}).status_code == 200
        assert http.get(f"/tenants/{tenant}").status_code == 200
        assert http.put(f"/tenants/{tenant}/quota", json={"rpm": 10**9}).status_code == 403
        assert http.delete(f"/tenants/{tenant}").status_code == 403
        assert http.post("/tenants", json={"name": "new"}).status_code == 403
        assert http.delete(f"/keys/{key_id}").status_code == 200


def test_weak_admin_tokens_are_refused() -> None:
    for weak in (None, "", "   ", "admin", "changeme", "password", "short", "a" * 40):
        with pytest.raises(SettingsError) as err:
            check_admin_token(weak)
        if weak and weak.strip():
            assert weak not in str(err.value)
    assert check_admin_token("tga_Zr0q8WcVhWQh1t5kUq9w") == "tga_Zr0q8WcVhWQh1t5kUq9w"
