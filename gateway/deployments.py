"""The deployed catalog: which models the deployment serves, kept in the database so that every
replica serves the same ones, and changed live through ``PUT/DELETE /admin/v1/models/{name}``.

The models file seeds it: on a deployment's first start, and again whenever the file changes
(its digest), its entries are stored over those of the same names; models deployed through
the admin API and absent from the file stay. Every replica checks the stored versions every
``refresh_s`` and applies what moved (`serving.EngineHost.deploy` and ``retire``), so a model
deployed on one replica is served by all within seconds.

Entries are stored as written: a source under ``{data_dir}`` or a hub id stays so, and each
replica resolves it against its own data directory; a relative path in the models file is
stored resolved against the file's folder.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

import msgspec

from gateway.db import AccountStore
from gateway.refresh import Reloaded
from serving import Catalog, CatalogError, EngineHost, ModelSpec, make_engine
from serving.catalog import AdapterSpec, check_spec, spec_document

__all__ = ["CatalogSync"]

logger = logging.getLogger(__name__)


class CatalogSync(Reloaded):
    """Keeps the host's catalog equal to the deployment's stored one.

    Args:
        accounts: Where the catalog is stored.
        host: The engines it deploys and retires.
        deployment: The deployment's name: replicas sharing it share the catalog.
        data_dir: Against which ``{data_dir}`` and relative sources resolve.
        refresh_s: How often the stored versions are checked.
        on_change: Called after the catalog changed here.
    """

    what = "the deployed catalog"
    meanwhile = "serving the models file's"

    def __init__(
        self,
        accounts: AccountStore,
        host: EngineHost,
        deployment: str,
        data_dir: Path,
        *,
        refresh_s: float = 2.0,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(refresh_s)
        self._on_change = on_change
        self.accounts = accounts
        self.host = host
        self.deployment = deployment
        self.data_dir = data_dir
        #: The stored version of each model this replica serves.
        self._applied: dict[str, int] = {}
        self._lock = asyncio.Lock()

    async def seed(self, models_file: Path, catalog: Catalog) -> None:
        """Store the models file's entries if the deployment has not seen this file."""
        digest = hashlib.sha256(await asyncio.to_thread(models_file.read_bytes)).hexdigest()
        specs = {spec.name: _stored(spec).decode() for spec in catalog}
        if await self.accounts.seed_catalog(self.deployment, digest, specs):
            logger.info("models file %s seeded deployment %r", models_file, self.deployment)

    async def reload(self) -> None:
        rows = await self.accounts.deployed_models(self.deployment)
        async with self._lock:
            before = self.host.catalog
            stored = {name: (version, spec) for name, version, spec in rows}
            for gone in [m.name for m in self.host.catalog.models if m.name not in stored]:
                self.host.retire(gone)
                self._applied.pop(gone, None)
            for name, (version, raw) in stored.items():
                if self._applied.get(name) == version:
                    continue
                try:
                    spec = self.check(msgspec.json.decode(raw, type=ModelSpec))
                    await self.host.deploy(spec)
                except Exception as exc:
                    logger.error("model %s (version %d) cannot be served: %s", name, version, exc)
                self._applied[name] = version
            if self.host.catalog is not before and self._on_change is not None:
                self._on_change()

    def check(self, spec: ModelSpec) -> ModelSpec:
        """``spec`` resolved here, and fitting the catalog beside the others.

        Raises:
            CatalogError: the source does not exist, or a name is not valid or is taken.
        """
        resolved = check_spec(spec, self.data_dir, self.data_dir)
        self.host.catalog.with_model(resolved)
        return resolved

    async def put(self, spec: ModelSpec) -> bool:
        """Deploy or change a model for every replica; whether it is new here.

        Raises:
            CatalogError: see `check`; or the engine arguments are not valid, or the
                tokenizer and configuration do not load.
        """
        resolved = self.check(spec)
        # What a replica does first with it (`EngineHost.deploy`): check its engine
        # arguments and load its tokenizer and configuration. A model that fails is refused
        # here rather than stored for every replica to fail on.
        trial = make_engine(resolved)
        trial.check_options()
        try:
            await asyncio.to_thread(trial.load_tokenizer)
        except Exception as exc:
            raise CatalogError(
                f"model {spec.name!r}: source {spec.source!r}: its tokenizer or configuration "
                f"did not load ({type(exc).__name__}: {str(exc)[:300]})"
            ) from None
        _version, created = await self.accounts.put_model(
            self.deployment, spec.name, _stored(spec).decode()
        )
        await self.reload()
        if self.host.catalog.get(resolved.name) is None:
            raise CatalogError(f"model {spec.name!r} could not be deployed (see the log)")
        return created

    async def put_adapter(self, model: str, adapter: AdapterSpec) -> bool:
        """Register (or replace) one of a model's LoRA adapters on every replica; whether it
        is new. A model whose engine runs without LoRA gets a new engine (see
        `serving.EngineHost.deploy`).

        Raises:
            KeyError: no model ``model``.
            CatalogError: see `check`.
        """
        spec = self.host.catalog.get(model)
        if spec is None or spec.name != model:
            raise KeyError(model)
        others = [a for a in spec.adapters if a.name != adapter.name]
        await self.put(msgspec.structs.replace(spec, adapters=(*others, adapter)))
        return len(others) == len(spec.adapters)

    async def delete_adapter(self, model: str, adapter: str) -> bool:
        """Take an adapter off a model on every replica; whether it had it."""
        spec = self.host.catalog.get(model)
        if spec is None or spec.name != model:
            return False
        kept = tuple(a for a in spec.adapters if a.name != adapter)
        if len(kept) == len(spec.adapters):
            return False
        await self.put(msgspec.structs.replace(spec, adapters=kept))
        return True

    async def delete(self, name: str) -> bool:
        """Retire a model on every replica; whether it was deployed."""
        found = await self.accounts.delete_model(self.deployment, name)
        await self.reload()
        return found


def _stored(spec: ModelSpec) -> bytes:
    source = spec.source
    if (
        not ("{data_dir}" in source or Path(source).is_absolute() or not spec.resolved_source)
        and Path(spec.resolved_source).exists()
    ):
        spec = msgspec.structs.replace(spec, source=spec.resolved_source)
    return spec_document(spec)
