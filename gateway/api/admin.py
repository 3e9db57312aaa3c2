"""The admin API under ``/admin/v1``: tenants, keys and quotas.

Callers: the operator (``TOLLGATE_ADMIN_TOKEN``) sees and changes everything; an admin-role
key manages its own tenant's keys and key quotas but cannot create or delete tenants or change
its tenant's quota; any other key gets 403. Objects of another tenant answer 404 with the same
body as a missing id, so ids cannot be probed. Bodies are closed: a field the route does not
take (``tenant_id``, ``role`` on a quota, ...) is a 400, never silently applied.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any, Literal, TypeVar

import msgspec
from litestar import Controller, Request, Response, delete, get, patch, post, put
from litestar.connection import ASGIConnection
from litestar.di import NamedDependency
from litestar.handlers.base import BaseRouteHandler
from litestar.params import FromPath

from gateway import db
from gateway.api import openapi as docs
from gateway.api._generation import json_response
from gateway.api._shapes import (
    ApiKey as ApiKeyBody,
)
from gateway.api._shapes import (
    ApiKeyList,
    DeletedTenant,
    NewApiKey,
    Quota,
    ServingPolicyBody,
    TenantList,
)
from gateway.api._shapes import (
    Tenant as TenantBody,
)
from gateway.api.schemas import decode
from gateway.auth import Principal, principal_of
from gateway.db import ApiKey, QuotaPolicy, Tenant
from gateway.deployments import CatalogSync
from gateway.errors import (
    APIError,
    Conflict,
    InvalidRequest,
    ModelNotFound,
    NotFound,
    PermissionDenied,
    error_response,
)
from gateway.policy import PolicyError, ServingPatch
from gateway.services import Services
from serving import CatalogError, EngineOptions, ModelSpec
from serving.catalog import AdapterSpec
from serving.pool import ModelStatus, Placement


class DeployedModels(msgspec.Struct):
    object: Literal["list"]
    data: list[ModelStatus]


class ModelDeployment(msgspec.Struct, forbid_unknown_fields=True):
    """A model to deploy, as a models file's ``[[models]]`` entry without its name (the path
    names it)."""

    #: A local path (``{data_dir}`` stands for the data directory; relative paths are
    #: taken relative to it), or a hub id already in the local cache.
    source: str
    kind: Literal["chat", "embedding"] = "chat"
    aliases: tuple[str, ...] = ()
    engine: EngineOptions = msgspec.field(default_factory=EngineOptions)
    memory_gb: Annotated[float, msgspec.Meta(gt=0)] | None = None
    pin: bool = False
    idle_timeout_s: Annotated[float, msgspec.Meta(gt=0)] | None = None
    adapters: tuple[AdapterSpec, ...] = ()


class AdapterRegistration(msgspec.Struct, forbid_unknown_fields=True):
    """A LoRA adapter in PEFT's layout on disk (``adapter_config.json`` and its weights)."""

    #: A local path (``{data_dir}`` stands for the data directory).
    source: str


class RegisteredAdapter(msgspec.Struct):
    id: str
    object: Literal["model"]
    parent: str
    source: str


class RetiredModel(msgspec.Struct):
    id: str
    object: Literal["model"]
    deleted: bool


__all__ = ["AdminController", "caller", "operator_only", "require_admin"]

T = TypeVar("T")

#: No NUL: PostgreSQL's text cannot hold it.
_Name = Annotated[str, msgspec.Meta(min_length=1, max_length=200, pattern=r"^[^\x00]*$")]
#: Limits as their columns hold them (32-bit and 64-bit signed integers).
_Count32 = Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]
_Count64 = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]


class TenantCreate(msgspec.Struct, forbid_unknown_fields=True):
    name: _Name


class TenantUpdate(msgspec.Struct, forbid_unknown_fields=True):
    name: _Name


class KeyCreate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: _Name
    models: list[str] | None = None
    #: Unix seconds or an RFC 3339 time.
    expires_at: int | datetime | None = None
    role: Literal["user", "admin"] = "user"


class QuotaPut(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A whole quota policy; a field left out or null is unlimited."""

    rpm: _Count32 | None = None
    tpm: _Count64 | None = None
    max_concurrency: _Count32 | None = None
    daily_tokens: _Count64 | None = None
    monthly_tokens: _Count64 | None = None
    #: USD as a string ("12.50"); a JSON number is read from its text, never through a float.
    monthly_spend_usd: Decimal | None = None


def _ts(value: datetime | None) -> int | None:
    return None if value is None else int(value.timestamp())


def _tenant_body(tenant: Tenant) -> dict[str, Any]:
    return {
        "id": tenant.id,
        "object": "organization.tenant",
        "name": tenant.name,
        "created_at": _ts(tenant.created_at),
    }


def _key_body(key: ApiKey, plaintext: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": key.id,
        "object": "organization.api_key",
        "tenant_id": key.tenant_id,
        "name": key.name,
        "role": key.role,
        "models": key.models,
        "redacted_value": f"{key.prefix}...{key.last4}",
        "created_at": _ts(key.created_at),
        "expires_at": _ts(key.expires_at),
        "revoked_at": _ts(key.revoked_at),
    }
    if plaintext is not None:
        body["value"] = plaintext
    return body


def _quota_body(tenant_id: str, key_id: str | None, policy: QuotaPolicy | None) -> dict[str, Any]:
    spend = None if policy is None else policy.monthly_spend_usd
    return {
        "object": "organization.quota",
        "tenant_id": tenant_id,
        "key_id": key_id,
        "rpm": None if policy is None else policy.rpm,
        "tpm": None if policy is None else policy.tpm,
        "max_concurrency": None if policy is None else policy.max_concurrency,
        "daily_tokens": None if policy is None else policy.daily_tokens,
        "monthly_tokens": None if policy is None else policy.monthly_tokens,
        "monthly_spend_usd": None if spend is None else str(spend),
    }


def require_admin(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    principal = principal_of(connection.scope)
    if principal is None or not principal.is_admin:
        raise PermissionDenied(
            "This API key may not use the admin API; use the admin token or an admin key."
        )


def caller(request: Request[Any, Any, Any]) -> Principal:
    principal = principal_of(request.scope)
    if principal is None:  # the guard has run: this cannot be reached
        raise PermissionDenied("Authentication is required for the admin API.")
    return principal


def _catalog(services: Services) -> CatalogSync:
    if services.catalog is None:
        raise Conflict("this gateway does not run its engines; change the catalog where they run")
    return services.catalog


def operator_only(principal: Principal, what: str) -> None:
    if not principal.operator:
        raise PermissionDenied(f"Only the operator may {what}.")


def _not_found(kind: str, object_id: str) -> NotFound:
    return NotFound(f"No {kind} with id '{object_id}'.", param="id")


def _account_error(_: Request[Any, Any, Any], exc: db.AccountError) -> Response[bytes]:
    error: APIError
    if isinstance(exc, db.NotFound):
        error = NotFound(str(exc))
    elif isinstance(exc, db.Conflict):
        error = Conflict(str(exc))
    else:
        error = InvalidRequest(str(exc))
    return error_response(error)


#: Every admin route: the caller may not use the admin API, or not this route.
_READ = (403,)
_READ_ONE = (403, 404)
_WRITE = (400, 403, 404, 409, 413)
_TENANT_ID = {"tenant_id": {"description": "The tenant's id (`ten_...`)."}}
_KEY_ID = {"key_id": {"description": "The key's id (`key_...`), not the key."}}


class AdminController(Controller):
    path = "/admin/v1"
    guards = [require_admin]  # noqa: RUF012 (litestar reads it as a class attribute)
    exception_handlers = {db.AccountError: _account_error}  # noqa: RUF012 (as above)

    async def _tenant(
        self, services: NamedDependency[Services], principal: Principal, tenant_id: str
    ) -> Tenant:
        """The tenant if the caller may see it; else 404, the same as a missing id."""
        if not principal.operator and principal.tenant_id != tenant_id:
            raise _not_found("tenant", tenant_id)
        if "\x00" in tenant_id:  # no id holds one, and PostgreSQL refuses to look it up
            raise _not_found("tenant", tenant_id)
        try:
            tenant = await services.accounts.get_tenant(tenant_id)
        except db.NotFound:
            raise _not_found("tenant", tenant_id) from None
        if tenant.deleted_at is not None:
            raise _not_found("tenant", tenant_id)
        return tenant

    async def _key(
        self, services: NamedDependency[Services], principal: Principal, key_id: str
    ) -> ApiKey:
        if "\x00" in key_id:  # no id holds one, and PostgreSQL refuses to look it up
            raise _not_found("key", key_id)
        try:
            key = await services.accounts.get_key(key_id)
        except db.NotFound:
            raise _not_found("key", key_id) from None
        if not principal.operator and key.tenant_id != principal.tenant_id:
            raise _not_found("key", key_id)
        await self._tenant(services, principal, key.tenant_id)
        return key

    # Tenants

    @post(
        "/tenants",
        status_code=201,
        operation_class=docs.operation(
            "createTenant",
            "Create a tenant (operator only)",
            tag="Admin",
            body=TenantCreate,
            answers={201: docs.json(TenantBody, "The tenant.")},
            errors=(400, 403, 409, 413),
        ),
    )
    async def create_tenant(
        self, request: Request[Any, Any, Any], services: NamedDependency[Services]
    ) -> Response[bytes]:
        operator_only(caller(request), "create tenants")
        body = decode(await request.body(), TenantCreate)
        tenant = await services.accounts.create_tenant(body.name)
        return json_response(_tenant_body(tenant), status_code=201)

    @get(
        "/tenants",
        operation_class=docs.operation(
            "listTenants",
            "List the tenants the caller may see",
            tag="Admin",
            answers={200: docs.json(TenantList, "The tenants.")},
            errors=_READ,
        ),
    )
    async def list_tenants(
        self, request: Request[Any, Any, Any], services: NamedDependency[Services]
    ) -> Response[bytes]:
        principal = caller(request)
        only = None if principal.operator else principal.tenant_id
        tenants = await services.accounts.list_tenants(tenant_id=only)
        return json_response({"object": "list", "data": [_tenant_body(t) for t in tenants]})

    @get(
        "/tenants/{tenant_id:str}",
        operation_class=docs.operation(
            "retrieveTenant",
            "Retrieve a tenant",
            tag="Admin",
            answers={200: docs.json(TenantBody, "The tenant.")},
            errors=_READ_ONE,
            params=_TENANT_ID,
        ),
    )
    async def get_tenant(
        self,
        tenant_id: FromPath[str],
        request: Request[Any, Any, Any],
        services: NamedDependency[Services],
    ) -> Response[bytes]:
        tenant = await self._tenant(services, caller(request), tenant_id)
        return json_response(_tenant_body(tenant))

    @patch(
        "/tenants/{tenant_id:str}",
        operation_class=docs.operation(
            "updateTenant",
            "Rename a tenant",
            tag="Admin",
            body=TenantUpdate,
            answers={200: docs.json(TenantBody, "The tenant.")},
            errors=_WRITE,
            params=_TENANT_ID,
        ),
    )
    async def update_tenant(
        self,
        tenant_id: FromPath[str],
        request: Request[Any, Any, Any],
        services: NamedDependency[Services],
    ) -> Response[bytes]:
        await self._tenant(services, caller(request), tenant_id)
        body = decode(await request.body(), TenantUpdate)
        tenant = await services.accounts.rename_tenant(tenant_id, body.name)
        return json_response(_tenant_body(tenant))

    @delete(
        "/tenants/{tenant_id:str}",
        status_code=200,
        operation_class=docs.operation(
            "deleteTenant",
            "Delete a tenant: its keys stop working (operator only)",
            tag="Admin",
            answers={200: docs.json(DeletedTenant, "The tenant is deleted.")},
            errors=(403, 404, 409),
            params=_TENANT_ID,
        ),
    )
    async def delete_tenant(
        self,
        tenant_id: FromPath[str],
        request: Request[Any, Any, Any],
        services: NamedDependency[Services],
    ) -> Response[bytes]:
        principal = caller(request)
        await self._tenant(services, principal, tenant_id)
        operator_only(principal, "delete tenants")
        await services.accounts.delete_tenant(tenant_id)
        services.authenticator.forget()
        return json_response({"id": tenant_id, "object": "organization.tenant", "deleted": True})

    # Keys

    @post(
        "/tenants/{tenant_id:str}/keys",
        status_code=201,
        operation_class=docs.operation(
            "createKey",
            "Create an API key; its value is in this answer only",
            tag="Admin",
            body=KeyCreate,
            answers={201: docs.json(NewApiKey, "The key, with its value.")},
            errors=_WRITE,
            params=_TENANT_ID,
        ),
    )
    async def create_key(
        self,
        tenant_id: FromPath[str],
        request: Request[Any, Any, Any],
        services: NamedDependency[Services],
    ) -> Response[bytes]:
        await self._tenant(services, caller(request), tenant_id)
        body = decode(await request.body(), KeyCreate)
        expires_at: datetime | None
        try:
            if isinstance(body.expires_at, int):
                expires_at = datetime.fromtimestamp(body.expires_at, UTC)
            elif body.expires_at is not None:
                if body.expires_at.tzinfo is None:
                    raise InvalidRequest("expires_at needs a time zone.", param="expires_at")
                expires_at = body.expires_at.astimezone(UTC)
            else:
                expires_at = None
        except (OverflowError, OSError, ValueError):  # beyond the years a datetime holds
            raise InvalidRequest("expires_at is out of range.", param="expires_at") from None
        if expires_at is not None and expires_at <= datetime.now(UTC):
            raise InvalidRequest("expires_at is in the past.", param="expires_at")
        if body.models is not None:
            catalog = services.host.catalog
            unknown = [m for m in body.models if catalog.resolve(m) is None]
            if unknown:
                raise InvalidRequest(f"Unknown model(s): {', '.join(unknown)}.", param="models")
            # Canonical names: a model (and with it its adapters), or one adapter.
            models: list[str] | None = sorted(
                {
                    f"{spec.name}:{adapter.name}" if adapter is not None else spec.name
                    for m in body.models
                    if (found := catalog.resolve(m)) is not None
                    for spec, adapter in [found]
                }
            )
        else:
            models = None
        key, plaintext = await services.accounts.create_key(
            tenant_id,
            name=body.name,
            role=body.role,
            models=models,
            expires_at=expires_at,
            secret=services.secret,
        )
        return json_response(_key_body(key, plaintext), status_code=201)

    @get(
        "/tenants/{tenant_id:str}/keys",
        operation_class=docs.operation(
            "listKeys",
            "List a tenant's keys",
            tag="Admin",
            answers={200: docs.json(ApiKeyList, "The keys.")},
            errors=_READ_ONE,
            params=_TENANT_ID,
        ),
    )
    async def list_keys(
        self,
        tenant_id: FromPath[str],
        request: Request[Any, Any, Any],
        services: NamedDependency[Services],
    ) -> Response[bytes]:
        await self._tenant(services, caller(request), tenant_id)
        keys = await services.accounts.list_keys(tenant_id)
        return json_response({"object": "list", "data": [_key_body(k) for k in keys]})

    @get(
        "/keys/{key_id:str}",
        operation_class=docs.operation(
            "retrieveKey",
            "Retrieve a key",
            tag="Admin",
            answers={200: docs.json(ApiKeyBody, "The key.")},
            errors=_READ_ONE,
            params=_KEY_ID,
        ),
    )
    async def get_key(
        self,
        key_id: FromPath[str],
        request: Request[Any, Any, Any],
        services: NamedDependency[Services],
    ) -> Response[bytes]:
        key = await self._key(services, caller(request), key_id)
        return json_response(_key_body(key))

    @delete(
        "/keys/{key_id:str}",
        status_code=200,
        operation_class=docs.operation(
            "revokeKey",
            "Revoke a key",
            tag="Admin",
            answers={200: docs.json(ApiKeyBody, "The key, revoked.")},
            errors=(403, 404, 409),
            params=_KEY_ID,
        ),
    )
    async def revoke_key(
        self,
        key_id: FromPath[str],
        request: Request[Any, Any, Any],
        services: NamedDependency[Services],
    ) -> Response[bytes]:
        await self._key(services, caller(request), key_id)
        key = await services.accounts.revoke_key(key_id)
        services.authenticator.forget()
        return json_response(_key_body(key))

    # Quotas

    @get(
        "/tenants/{tenant_id:str}/quota",
        operation_class=docs.operation(
            "retrieveTenantQuota",
            "Retrieve a tenant's quota",
            tag="Admin",
            answers={200: docs.json(Quota, "The quota.")},
            errors=_READ_ONE,
            params=_TENANT_ID,
        ),
    )
    async def get_tenant_quota(
        self,
        tenant_id: FromPath[str],
        request: Request[Any, Any, Any],
        services: NamedDependency[Services],
    ) -> Response[bytes]:
        await self._tenant(services, caller(request), tenant_id)
        policy = await services.accounts.get_quota(tenant_id)
        return json_response(_quota_body(tenant_id, None, policy))

    @put(
        "/tenants/{tenant_id:str}/quota",
        operation_class=docs.operation(
            "setTenantQuota",
            "Set a tenant's quota (operator only)",
            tag="Admin",
            body=QuotaPut,
            answers={200: docs.json(Quota, "The quota.")},
            errors=_WRITE,
            params=_TENANT_ID,
        ),
    )
    async def put_tenant_quota(
        self,
        tenant_id: FromPath[str],
        request: Request[Any, Any, Any],
        services: NamedDependency[Services],
    ) -> Response[bytes]:
        principal = caller(request)
        await self._tenant(services, principal, tenant_id)
        operator_only(principal, "change a tenant's quota")
        body = decode(await request.body(), QuotaPut)
        policy = await services.accounts.set_quota(tenant_id, None, **msgspec.structs.asdict(body))
        services.authenticator.forget()
        return json_response(_quota_body(tenant_id, None, policy))

    @get(
        "/keys/{key_id:str}/quota",
        operation_class=docs.operation(
            "retrieveKeyQuota",
            "Retrieve a key's quota",
            tag="Admin",
            answers={200: docs.json(Quota, "The quota.")},
            errors=_READ_ONE,
            params=_KEY_ID,
        ),
    )
    async def get_key_quota(
        self,
        key_id: FromPath[str],
        request: Request[Any, Any, Any],
        services: NamedDependency[Services],
    ) -> Response[bytes]:
        key = await self._key(services, caller(request), key_id)
        policy = await services.accounts.get_quota(key.tenant_id, key.id)
        return json_response(_quota_body(key.tenant_id, key.id, policy))

    @put(
        "/keys/{key_id:str}/quota",
        operation_class=docs.operation(
            "setKeyQuota",
            "Set a key's quota",
            tag="Admin",
            body=QuotaPut,
            answers={200: docs.json(Quota, "The quota.")},
            errors=_WRITE,
            params=_KEY_ID,
        ),
    )
    async def put_key_quota(
        self,
        key_id: FromPath[str],
        request: Request[Any, Any, Any],
        services: NamedDependency[Services],
    ) -> Response[bytes]:
        key = await self._key(services, caller(request), key_id)
        body = decode(await request.body(), QuotaPut)
        policy = await services.accounts.set_quota(
            key.tenant_id, key.id, **msgspec.structs.asdict(body)
        )
        services.authenticator.forget()
        return json_response(_quota_body(key.tenant_id, key.id, policy))

    # The models on the device

    @get(
        "/models",
        operation_class=docs.operation(
            "listDeployedModels",
            "List the models with their state, memory, demand and cold starts (operator only)",
            tag="Admin",
            answers={200: docs.json(DeployedModels, "Every model of the catalog.")},
            errors=_READ,
        ),
    )
    async def list_models(
        self, request: Request[Any, Any, Any], services: NamedDependency[Services]
    ) -> Response[bytes]:
        operator_only(caller(request), "list the deployed models")
        rows = [msgspec.structs.asdict(s) for s in services.host.models_status()]
        return json_response({"object": "list", "data": rows})

    @put(
        "/models/{name:str}",
        operation_class=docs.operation(
            "deployModel",
            "Deploy a model, or change one, on every replica without a restart (operator only)",
            tag="Admin",
            body=ModelDeployment,
            answers={
                200: docs.json(ModelStatus, "The model was changed."),
                201: docs.json(ModelStatus, "The model was deployed."),
            },
            errors=(400, 403, 409, 413),
        ),
    )
    async def deploy_model(
        self,
        request: Request[Any, Any, Any],
        services: NamedDependency[Services],
        name: FromPath[str],
    ) -> Response[bytes]:
        operator_only(caller(request), "deploy models")
        sync = _catalog(services)
        body = decode(await request.body(), ModelDeployment)
        spec = ModelSpec(name=name, **msgspec.structs.asdict(body))
        try:
            created = await sync.put(spec)
        except CatalogError as exc:
            text = str(exc)
            param = next((p for p in ("source", "engine", "adapter") if p in text), "name")
            raise InvalidRequest(text, param=param) from None
        row = next(s for s in services.host.models_status() if s.name == name)
        return json_response(msgspec.to_builtins(row), status_code=201 if created else 200)

    @delete(
        "/models/{name:str}",
        status_code=200,
        operation_class=docs.operation(
            "retireModel",
            "Retire a model on every replica: it finishes its requests, then stops (operator only)",
            tag="Admin",
            answers={200: docs.json(RetiredModel, "The model is retired.")},
            errors=(403, 404, 409),
        ),
    )
    async def retire_model(
        self,
        request: Request[Any, Any, Any],
        services: NamedDependency[Services],
        name: FromPath[str],
    ) -> Response[bytes]:
        operator_only(caller(request), "retire models")
        sync = _catalog(services)
        spec = services.host.catalog.get(name)
        if spec is None or spec.name != name or not await sync.delete(name):
            raise ModelNotFound(name)
        return json_response({"id": name, "object": "model", "deleted": True})

    @put(
        "/models/{name:str}/adapters/{adapter:str}",
        operation_class=docs.operation(
            "registerAdapter",
            "Register a LoRA adapter of a model, served as `model:adapter` (operator only)",
            tag="Admin",
            body=AdapterRegistration,
            answers={
                200: docs.json(RegisteredAdapter, "The adapter was replaced."),
                201: docs.json(RegisteredAdapter, "The adapter was registered."),
            },
            errors=(400, 403, 404, 409, 413),
        ),
    )
    async def register_adapter(
        self,
        request: Request[Any, Any, Any],
        services: NamedDependency[Services],
        name: FromPath[str],
        adapter: FromPath[str],
    ) -> Response[bytes]:
        operator_only(caller(request), "register adapters")
        sync = _catalog(services)
        body = decode(await request.body(), AdapterRegistration)
        try:
            created = await sync.put_adapter(name, AdapterSpec(name=adapter, source=body.source))
        except KeyError:
            raise ModelNotFound(name) from None
        except CatalogError as exc:
            param = "source" if "source" in str(exc) else "adapter"
            raise InvalidRequest(str(exc), param=param) from None
        return json_response(
            {"id": f"{name}:{adapter}", "object": "model", "parent": name, "source": body.source},
            status_code=201 if created else 200,
        )

    @delete(
        "/models/{name:str}/adapters/{adapter:str}",
        status_code=200,
        operation_class=docs.operation(
            "removeAdapter",
            "Take a LoRA adapter off a model (operator only)",
            tag="Admin",
            answers={200: docs.json(RetiredModel, "The adapter is gone.")},
            errors=(403, 404, 409),
        ),
    )
    async def remove_adapter(
        self,
        request: Request[Any, Any, Any],
        services: NamedDependency[Services],
        name: FromPath[str],
        adapter: FromPath[str],
    ) -> Response[bytes]:
        operator_only(caller(request), "remove adapters")
        if not await _catalog(services).delete_adapter(name, adapter):
            raise ModelNotFound(f"{name}:{adapter}")
        return json_response({"id": f"{name}:{adapter}", "object": "model", "deleted": True})

    @get(
        "/placement",
        operation_class=docs.operation(
            "retrievePlacement",
            "Which models hold the device's memory, and how much of it (operator only)",
            tag="Admin",
            answers={200: docs.json(Placement, "The device's placement.")},
            errors=_READ,
        ),
    )
    async def get_placement(
        self, request: Request[Any, Any, Any], services: NamedDependency[Services]
    ) -> Response[bytes]:
        operator_only(caller(request), "read the placement")
        return json_response(msgspec.to_builtins(services.host.placement()))

    # The serving policy

    @get(
        "/serving",
        operation_class=docs.operation(
            "retrieveServingPolicy",
            "Retrieve the serving policy in force (operator only)",
            tag="Admin",
            answers={200: docs.json(ServingPolicyBody, "The policy.")},
            errors=_READ,
        ),
    )
    async def get_serving(
        self, request: Request[Any, Any, Any], services: NamedDependency[Services]
    ) -> Response[bytes]:
        operator_only(caller(request), "read the serving policy")
        return json_response(services.policy.effective())

    @patch(
        "/serving",
        operation_class=docs.operation(
            "updateServingPolicy",
            "Change the serving policy, live, on every replica (operator only)",
            tag="Admin",
            body=ServingPatch,
            answers={200: docs.json(ServingPolicyBody, "The policy now in force.")},
            errors=(400, 403, 409, 413),
        ),
    )
    async def patch_serving(
        self, request: Request[Any, Any, Any], services: NamedDependency[Services]
    ) -> Response[bytes]:
        operator_only(caller(request), "change the serving policy")
        raw = await request.body()
        decode(raw, ServingPatch)  # the shape, with OpenAI-style errors
        try:
            await services.policy.patch(msgspec.json.decode(raw))
        except PolicyError as exc:
            raise InvalidRequest(f"invalid serving policy: {exc}") from None
        return json_response(services.policy.effective())
