"""A thin client of the admin API that remembers every secret it was handed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx


@dataclass(frozen=True)
class IssuedKey:
    id: str
    value: str
    tenant_id: str


class Admin:
    """Calls ``/admin/v1`` as the operator; asserts each call succeeded."""

    def __init__(self, http: httpx.Client, secrets: list[str]) -> None:
        self.http = http
        self.secrets = secrets

    def _ok(self, response: httpx.Response, status: int = 200) -> Any:
        assert response.status_code == status, response.text
        return response.json()

    def tenant(self, name: str, **quota: Any) -> str:
        tenant_id: str = self._ok(self.http.post("/tenants", json={"name": name}), 201)["id"]
        if quota:
            self.quota(tenant_id, **quota)
        return tenant_id

    def issue(self, tenant_id: str, name: str = "key", **fields: Any) -> IssuedKey:
        body = self._ok(
            self.http.post(f"/tenants/{tenant_id}/keys", json={"name": name, **fields}), 201
        )
        self.secrets.append(body["value"])
        return IssuedKey(body["id"], body["value"], tenant_id)

    def key(self, tenant_id: str, name: str = "key", **fields: Any) -> str:
        return self.issue(tenant_id, name, **fields).value

    def quota(self, tenant_id: str, **limits: Any) -> dict[str, Any]:
        result: dict[str, Any] = self._ok(self.http.put(f"/tenants/{tenant_id}/quota", json=limits))
        return result

    def key_quota(self, key_id: str, **limits: Any) -> dict[str, Any]:
        result: dict[str, Any] = self._ok(self.http.put(f"/keys/{key_id}/quota", json=limits))
        return result
