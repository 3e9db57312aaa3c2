"""Gateway settings, read once from ``TOLLGATE_*`` environment variables at start-up."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

import msgspec

from billing.pricing import device_rate
from serving.catalog import default_catalog_path

__all__ = ["Settings", "SettingsError"]


class SettingsError(ValueError):
    """A setting is missing or malformed; the message names the variable."""


_SECRET_FIELDS = frozenset({"admin_token", "secret"})


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    """Everything the gateway is configured with."""

    host: str = "127.0.0.1"
    port: int = 8000
    #: Where Tollgate keeps its files: demo models, the embedded database, its secret.
    data_dir: str = ".tollgate"
    #: The models file (TOML); the demo catalog when unset. It seeds the deployment's
    #: catalog in the database on first start and whenever it changes.
    models: str | None = None
    #: The deployment's name: replicas with the same name (and database) serve the same
    #: catalog, changed live through the admin API.
    deployment: Annotated[str, msgspec.Meta(min_length=1, max_length=100)] = "default"
    #: Request bodies larger than this get 413.
    max_body_bytes: int = 4 * 1024 * 1024
    #: Upper bounds on what one request may ask for.
    max_n: int = 16
    max_messages: int = 2048
    max_embedding_inputs: int = 2048
    log_level: str = "INFO"
    #: Tenants, keys and quota policies; SQLite under the data dir when unset.
    database_url: str | None = None
    #: The shared quota store; unset means an in-process store (one replica only).
    redis_url: str | None = None
    #: The operator's token for ``/admin/v1``; required, and refused when weak or well known.
    admin_token: str | None = None
    #: Keys are stored as HMACs under this secret; every replica must share it. Unset: one
    #: is made and kept under the data dir (the embedded default).
    secret: str | None = None
    #: ``false`` turns off keys and quotas altogether (benchmarks of the bare path only).
    auth: bool = True
    #: What rate limits do when the quota store is down or slow (budgets always fail closed).
    quota_fail_open: bool = True
    #: How long admission waits for the quota store before treating it as down.
    quota_timeout_ms: int = 150
    #: How long usage events a replica took from the shared outbox (Redis) and did not
    #: acknowledge wait before another replica takes them over (the first presumed dead).
    outbox_claim_idle_s: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    #: How long an unsettled reservation holds a concurrency slot (a replica died mid-request).
    quota_lease_s: int = 900
    #: How long a key lookup is trusted; a revoked key stops working within this.
    key_cache_s: float = 1.0
    #: While the accounts database fails, a key found within this long keeps working.
    key_stale_s: Annotated[float, msgspec.Meta(ge=0)] = 300.0
    #: How long a well-formed key that is not found is remembered as not found.
    key_unknown_cache_s: Annotated[float, msgspec.Meta(ge=0)] = 5.0
    #: How long a request waits for a key lookup before it gets 503 (or the stale entry).
    key_lookup_timeout_ms: Annotated[int, msgspec.Meta(gt=0)] = 2000
    #: The most key lookups in the database at once; unknown keys may hold half of them.
    key_lookup_concurrency: Annotated[int, msgspec.Meta(ge=2)] = 4
    #: Run database migrations at start-up.
    migrate: bool = True
    #: How long a request waits for an engine that is restarting before it gets 503.
    engine_wait_s: Annotated[float, msgspec.Meta(ge=0)] = 10.0
    #: The device's memory for models, in GiB (weights plus KV budgets); unset: measured
    #: (a GPU's total memory, or the host's available memory on a CPU).
    device_memory_gb: Annotated[float, msgspec.Meta(gt=0)] | None = None
    #: The kind of device this process's own engines run on (``cpu``, ``cuda``, ...);
    #: unset: vLLM's platform's. Workers declare their own.
    device_kind: str | None = None
    #: What an hour of that device costs, in USD: the engine time of requests it serves is
    #: billed at this rate (``0``: engine time is shown on bills, not charged).
    device_cost_per_hour: str = "0"
    #: How long a request waits for its model to be brought onto the device before 503.
    cold_start_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 120.0
    #: Models without requests for this long leave the device (sleep on GPUs, stop on
    #: CPUs), unless pinned; unset: they stay. A model's catalog entry may set its own.
    idle_timeout_s: Annotated[float, msgspec.Meta(gt=0)] | None = None
    #: ``local``: this process runs the engines (the embedded default); ``workers``: it
    #: holds none and routes each request to a ``tollgate worker`` found in the registry
    #: (Redis, ``redis_url``).
    engines: Literal["local", "workers"] = "local"
    #: How a gateway in front of workers chooses one: ``affinity`` (prefix-cache aware,
    #: bounded loads) or ``round_robin``.
    routing: Literal["affinity", "round_robin"] = "affinity"
    #: No worker takes more than ``1 + route_balance`` times its share of the requests in
    #: flight.
    route_balance: Annotated[float, msgspec.Meta(ge=0)] = 0.5
    #: Where ``tollgate serve`` sends the engines' own output (``-``: leave it on the
    #: console); unset: ``logs/engines.log`` under the data dir.
    engine_log: str | None = None
    #: The response cache and single flight of deterministic requests.
    cache: bool = True
    #: How long a cached answer serves hits.
    cache_ttl_s: Annotated[float, msgspec.Meta(ge=0)] = 300.0
    #: The most the cached answers take, in MiB (on Redis when ``redis_url`` is set).
    cache_max_mb: Annotated[float, msgspec.Meta(gt=0)] = 256.0
    #: Models whose cached answers are shared across tenants (comma-separated names); every
    #: other model's are the tenant's own.
    cache_shared_models: str = ""

    def __repr__(self) -> str:
        shown = {
            f: ("***" if f in _SECRET_FIELDS and v else v)
            for f, v in msgspec.structs.asdict(self).items()
        }
        if self.database_url:
            from gateway.db import redact_url

            shown["database_url"] = redact_url(self.database_url)
        if self.redis_url:
            from gateway.db import redact_url

            shown["redis_url"] = redact_url(self.redis_url)
        return f"Settings({', '.join(f'{k}={v!r}' for k, v in shown.items())})"

    __str__ = __repr__

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)

    @property
    def database(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_path / 'tollgate.db'}"

    @property
    def engine_log_path(self) -> Path | None:
        if self.engine_log == "-":
            return None
        return Path(self.engine_log) if self.engine_log else self.data_path / "logs" / "engines.log"

    @property
    def models_path(self) -> Path:
        return Path(self.models) if self.models is not None else default_catalog_path()

    def __post_init__(self) -> None:
        device_rate(self.device_cost_per_hour)  # ValueError: a clear setting error

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Settings from ``TOLLGATE_<FIELD>`` variables, then ``overrides`` on top.

        Raises:
            SettingsError: a variable does not parse as its field's type.
        """
        env = os.environ if env is None else env
        raw: dict[str, object] = {}
        for field in msgspec.structs.fields(cls):
            value = env.get(f"TOLLGATE_{field.name.upper()}")
            if value is not None and value != "":
                raw[field.name] = value
        raw.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return msgspec.convert(raw, cls, strict=False)
        except msgspec.ValidationError as exc:
            raise SettingsError(f"invalid setting: {exc} (TOLLGATE_<FIELD> variables)") from exc
