"""The serving policy: what the operator tunes live (``GET/PATCH /admin/v1/serving``).

One JSON document, kept in the database so that every replica applies the same one::

    {
      "cache":  {"enabled": true, "ttl_s": 300, "max_mb": 256, "shared_models": []},
      "queue":  {"slots": null, "max_queued": 1024},         # every engine, unless ...
      "models": {"demo-chat": {"slots": 64, "max_queued": 200}},   # ... a model says
      "tenants": {"ten_...": {"weight": 3, "priority": "batch", "isolate_prefix": true}},
      "keys":    {"key_...": {"weight": 1, "priority": "interactive"}}
    }

Fields left out take their defaults: the ``TOLLGATE_CACHE_*`` settings, each engine's own
``max_num_seqs`` for its slots. A change is a JSON merge patch (RFC 7386: ``null`` removes a
field), checked whole before it is stored; each replica reloads the document when its
version moves (every ``refresh_s``) and applies it without dropping anything in flight: a
queue that gets more slots lets waiting requests in, one that gets fewer lets no new ones in
until it is under them.

A tenant's requests share one fairness group; a key with a weight of its own is a group of its
own. ``isolate_prefix`` gives a tenant's prompts a prefix-cache salt of their own (vLLM's
``cache_salt``), so that no other tenant's request reuses (or times) its cached blocks.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from typing import Annotated, Any, TypeVar

import msgspec

from gateway.auth import Principal
from gateway.cache import ResponseCache
from gateway.db import AccountStore
from gateway.refresh import Reloaded
from gateway.settings import Settings
from serving import EngineHost, GenerationEngine, Priority, RequestContext

__all__ = ["PolicyError", "ServingControl", "ServingPatch", "ServingPolicy", "merge_patch"]

logger = logging.getLogger(__name__)

_Weight = Annotated[float, msgspec.Meta(gt=0, le=1000)]
_T = TypeVar("_T")


class CachePolicy(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    enabled: bool | None = None
    ttl_s: Annotated[float, msgspec.Meta(ge=0, le=30 * 86400)] | None = None
    max_mb: Annotated[float, msgspec.Meta(gt=0, le=1024 * 1024)] | None = None
    shared_models: list[str] | None = None


class QueuePolicy(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    #: Requests the engine runs at once (default: its ``max_num_seqs``).
    slots: Annotated[int, msgspec.Meta(ge=1, le=100_000)] | None = None
    #: Requests that may wait for it at once.
    max_queued: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)] | None = None


class Share(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    weight: _Weight | None = None
    priority: Priority | None = None
    isolate_prefix: bool | None = None


class ServingPolicy(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    cache: CachePolicy = msgspec.field(default_factory=CachePolicy)
    queue: QueuePolicy = msgspec.field(default_factory=QueuePolicy)
    models: dict[str, QueuePolicy] = msgspec.field(default_factory=dict)
    tenants: dict[str, Share] = msgspec.field(default_factory=dict)
    keys: dict[str, Share] = msgspec.field(default_factory=dict)


class ServingPatch(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """A JSON merge patch of the policy (the body of ``PATCH``): ``null`` removes a field (back
    to its default) or a whole model, tenant or key entry."""

    cache: CachePolicy | None = None
    queue: QueuePolicy | None = None
    models: dict[str, QueuePolicy | None] | None = None
    tenants: dict[str, Share | None] | None = None
    keys: dict[str, Share | None] | None = None


class PolicyError(ValueError):
    """A document or a patch that is not a valid serving policy (the message says why)."""


def _first(*values: _T | None) -> _T:
    """The first value that is set (the last one always is)."""
    for value in values:
        if value is not None:
            return value
    raise ValueError("no value set")


def merge_patch(target: Any, patch: Any) -> Any:
    """``patch`` applied to ``target`` as a JSON merge patch (RFC 7386)."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for name, value in patch.items():
        if value is None:
            result.pop(name, None)
        else:
            result[name] = merge_patch(result.get(name), value)
    return result


class ServingControl(Reloaded):
    """Holds the policy in force in this replica, applies it, and keeps it in step with the
    database.

    Args:
        accounts: Where the document lives.
        host: The engines whose queues it sizes.
        cache: The response cache it tunes.
        settings: The defaults of the cache fields.
        secret: Keys the prefix-cache salts (so they say nothing of tenant ids).
        refresh_s: How often the document's version is checked.
    """

    what = "the serving policy"
    meanwhile = "using the defaults"

    def __init__(
        self,
        accounts: AccountStore,
        host: EngineHost,
        cache: ResponseCache,
        settings: Settings,
        secret: bytes,
        *,
        refresh_s: float = 2.0,
    ) -> None:
        super().__init__(refresh_s)
        self.accounts = accounts
        self.host = host
        self.cache = cache
        self.settings = settings
        self._secret = secret
        self.version = 0
        self.document: dict[str, Any] = {}
        self.policy = ServingPolicy()
        self._salts: dict[str, str] = {}
        #: The models shared across tenants unless the policy says otherwise (the settings').
        self._default_shared = cache.shared_models

    async def reload(self) -> None:
        version, raw = await self.accounts.get_serving_policy()
        if version == self.version and version != 0:
            return
        document = msgspec.json.decode(raw)
        self._apply(version, document, self.check(document))

    def reapply(self) -> None:
        """Apply the policy in force again (to engines the catalog gained since)."""
        self._apply(self.version, self.document, self.policy)

    def check(self, document: Any) -> ServingPolicy:
        """The policy of ``document``.

        Raises:
            PolicyError: not a valid policy, or it names a model that is not in the catalog.
        """
        try:
            policy = msgspec.convert(document, ServingPolicy)
        except msgspec.ValidationError as exc:
            raise PolicyError(str(exc)) from None
        catalog = self.host.catalog
        for name in [*policy.models, *(policy.cache.shared_models or [])]:
            if catalog.get(name) is None:
                raise PolicyError(f"no model named {name!r}")
        return policy

    async def patch(self, patch: Any) -> None:
        """Apply a merge patch to the stored document, store it, and apply it here at once.

        Raises:
            PolicyError: the result is not a valid policy.
            gateway.db.Conflict: another replica changed it at the same moment.
        """
        if not isinstance(patch, dict):
            raise PolicyError("a change to the serving policy is a JSON object")
        version, raw = await self.accounts.get_serving_policy()
        document = merge_patch(msgspec.json.decode(raw), self._canonical(patch))
        policy = self.check(document)
        # Model names are stored as the catalog names them (an alias finds the same model).
        new_version = await self.accounts.set_serving_policy(
            msgspec.json.encode(document).decode(), version
        )
        self._apply(new_version, document, policy)

    def _canonical(self, patch: dict[str, Any]) -> dict[str, Any]:
        """The patch with every model named as the catalog names it (not by an alias), so that
        one model never has two entries."""
        catalog = self.host.catalog

        def name(model: Any) -> Any:
            spec = catalog.get(model) if isinstance(model, str) else None
            return model if spec is None else spec.name

        patch = dict(patch)
        if isinstance(models := patch.get("models"), dict):
            patch["models"] = {name(k): v for k, v in models.items()}
        cache = patch.get("cache")
        if isinstance(cache, dict) and isinstance(cache.get("shared_models"), list):
            patch["cache"] = {**cache, "shared_models": [name(m) for m in cache["shared_models"]]}
        return patch

    def _apply(self, version: int, document: dict[str, Any], policy: ServingPolicy) -> None:
        settings, cache, rules = self.settings, self.cache, policy.cache
        cache.enabled = _first(rules.enabled, settings.cache)
        cache.ttl_s = _first(rules.ttl_s, settings.cache_ttl_s)
        cache.store.max_bytes = int(_first(rules.max_mb, settings.cache_max_mb) * 1024 * 1024)
        cache.shared_models = (
            self._default_shared
            if rules.shared_models is None
            else frozenset(
                spec.name
                for name in rules.shared_models
                if (spec := self.host.catalog.get(name)) is not None
            )
        )
        for engine in self.host.engines():
            queue = getattr(engine, "queue", None)
            if queue is None or not isinstance(engine, GenerationEngine):
                continue
            # Stored documents name models as the catalog does (see `_canonical`).
            own = policy.models.get(engine.name, QueuePolicy())
            queue.max_queued = _first(
                own.max_queued, policy.queue.max_queued, queue.default_max_queued
            )
            queue.slots = _first(own.slots, policy.queue.slots, queue.default_slots)
        self.version, self.document, self.policy = version, document, policy

    def effective(self) -> dict[str, Any]:
        """The policy in force, every default filled in (what ``GET`` answers)."""
        cache = self.cache
        queues = {}
        for engine in self.host.engines():
            queue = getattr(engine, "queue", None)
            if queue is not None and isinstance(engine, GenerationEngine):
                queues[engine.name] = {"slots": queue.slots, "max_queued": queue.max_queued}
        policy = self.policy
        return {
            "object": "serving_policy",
            "version": self.version,
            "cache": {
                "enabled": cache.enabled,
                "ttl_s": cache.ttl_s,
                "max_mb": cache.store.max_bytes / (1024 * 1024),
                "shared_models": sorted(cache.shared_models),
            },
            "queue": msgspec.to_builtins(policy.queue),
            "models": queues,
            "tenants": msgspec.to_builtins(policy.tenants),
            "keys": msgspec.to_builtins(policy.keys),
        }

    def context(self, principal: Principal | None) -> RequestContext:
        """The engine request context of a caller's requests."""
        if principal is None or not principal.tenant_id:
            return RequestContext()
        tenant_id = principal.tenant_id
        tenant = self.policy.tenants.get(tenant_id)
        key = self.policy.keys.get(principal.key_id) if principal.key_id else None
        group = tenant_id
        weight = 1.0
        if tenant is not None and tenant.weight is not None:
            weight = tenant.weight
        if key is not None and key.weight is not None:
            group, weight = f"{tenant_id}/{principal.key_id}", key.weight
        priority: Priority = "interactive"
        for share in (tenant, key):
            if share is not None and share.priority is not None:
                priority = share.priority
        salt = None
        if tenant is not None and tenant.isolate_prefix:
            salt = self._salt(tenant_id)
        return RequestContext(group=group, weight=weight, priority=priority, cache_salt=salt)

    def _salt(self, tenant_id: str) -> str:
        salt = self._salts.get(tenant_id)
        if salt is None:
            digest = hmac.new(self._secret, b"prefix-salt:" + tenant_id.encode(), hashlib.sha256)
            salt = self._salts[tenant_id] = digest.hexdigest()[:32]
        return salt
