"""The litestar application factory."""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from litestar import Litestar
from litestar.di import Provide
from litestar.middleware import DefineMiddleware

from billing.flusher import Flusher
from billing.ledger import Ledger
from billing.outbox import SqlOutbox, make_outbox
from billing.spool import Spool
from gateway.admission import Admission
from gateway.api import (
    AdminController,
    BillingController,
    HealthController,
    MetricsController,
    OpenAIController,
)
from gateway.api.openapi import openapi_config
from gateway.auth import Authenticator, AuthMiddleware
from gateway.cache import CacheStore, MemoryCacheStore, RedisCacheStore, ResponseCache
from gateway.calls import CallGuard, call_of
from gateway.credentials import check_admin_token, load_secret
from gateway.db import AccountStore, make_engine, upgrade
from gateway.deployments import CatalogSync
from gateway.errors import exception_handlers
from gateway.metrics import registry_for
from gateway.middleware import add_request_id
from gateway.policy import ServingControl
from gateway.quotas import MemoryQuotaStore, QuotaStore, RedisQuotaStore
from gateway.quotas.watchdog import StoreWatchdog
from gateway.services import Services
from gateway.settings import Settings, SettingsError
from gateway.telemetry import Telemetry, setup_telemetry
from gateway.usage import UsageRecorder
from serving import Catalog, EngineHost, load_catalog
from serving.placement import detect_device_kind
from serving.progress import Progress
from serving.remote import RemoteHost

__all__ = ["create_app"]

logger = logging.getLogger(__name__)


def host_for(
    settings: Settings, catalog: Catalog, *, progress: Progress | None = None
) -> EngineHost:
    """The engines of ``catalog`` on this process's device, as the settings size them; or,
    with ``TOLLGATE_ENGINES=workers``, the workers' engines, reached over the wire.

    Raises:
        SettingsError: workers are asked for without a registry (``TOLLGATE_REDIS_URL``).
    """
    if settings.engines == "workers":
        if not settings.redis_url:
            raise SettingsError("TOLLGATE_ENGINES=workers needs TOLLGATE_REDIS_URL (the registry)")
        from serving.registry import WorkerRegistry
        from serving.router import Router

        return RemoteHost(
            WorkerRegistry.from_url(settings.redis_url, settings.deployment),
            Router(settings.routing, balance=settings.route_balance),
            load_secret(settings),
        )
    return EngineHost(
        catalog,
        ready_wait_s=settings.engine_wait_s,
        progress=progress,
        budget_gb=settings.device_memory_gb,
        cold_start_timeout_s=settings.cold_start_timeout_s,
        idle_timeout_s=settings.idle_timeout_s,
    )


def create_app(
    settings: Settings,
    *,
    host: EngineHost | None = None,
    telemetry: Telemetry | None = None,
    on_ready: Callable[[], None] | None = None,
    on_startup_failure: Callable[[BaseException], None] | None = None,
    own_engines: bool = True,
    progress: Progress | None = None,
) -> Litestar:
    """Build the gateway app; its engines start in the background once the app starts.

    ``/healthz`` answers at once, ``/readyz`` only when every engine is up. With
    ``own_engines=False`` the caller starts and stops ``host`` (several apps sharing one host).
    ``progress`` hears of each engine's start-up (``tollgate serve`` prints it).

    Raises:
        CatalogError: the models file is wrong; the message names the entry.
        SettingsError: a setting is missing or unsafe (the admin token, the secret).
    """
    admin_token = check_admin_token(settings.admin_token) if settings.auth else ""
    secret = load_secret(settings)
    if host is None:
        host = host_for(
            settings, load_catalog(settings.models_path, settings.data_path), progress=progress
        )
    shared_models = []
    for name in filter(None, (n.strip() for n in settings.cache_shared_models.split(","))):
        spec = host.catalog.get(name)
        if spec is None and not host.local:  # the workers' models are known once they are
            shared_models.append(name)
            continue
        if spec is None:
            raise SettingsError(f"TOLLGATE_CACHE_SHARED_MODELS names an unknown model: {name!r}")
        shared_models.append(spec.name)
    telemetry = telemetry or setup_telemetry()
    if isinstance(host, RemoteHost):
        host.tracer = telemetry.tracer
    startup: dict[str, str | None] = {"error": None}
    database = make_engine(settings.database)
    accounts = AccountStore(database)
    ledger = Ledger(database)
    store: QuotaStore = (
        # The client's own timeouts are a hard cap; admission gives up sooner, as soon as
        # the watchdog finds the store silent for quota_timeout_ms.
        RedisQuotaStore.from_url(settings.redis_url, timeout_s=5.0)
        if settings.redis_url
        else MemoryQuotaStore()
    )
    authenticator = Authenticator(
        accounts,
        secret=secret,
        admin_token=admin_token,
        cache_s=settings.key_cache_s,
        stale_s=settings.key_stale_s,
        unknown_cache_s=settings.key_unknown_cache_s,
        lookup_timeout_s=settings.key_lookup_timeout_ms / 1000,
        max_lookups=settings.key_lookup_concurrency,
    )
    services_box: dict[str, Services] = {}

    def started(task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            rows = host.models_status()
            logger.info(
                "models ready: %s; cold until asked for: %s",
                ", ".join(r.name for r in rows if r.state == "ready") or "none",
                ", ".join(r.name for r in rows if r.state != "ready") or "none",
            )
            if not host.local:
                logger.info("routing to workers (%s)", settings.routing)
            if on_ready is not None:
                on_ready()
            return
        startup["error"] = f"{type(exc).__name__}: {exc}"
        logger.error("engine start-up failed: %s", startup["error"])
        if on_startup_failure is not None:
            on_startup_failure(exc)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        if settings.migrate:
            await asyncio.to_thread(upgrade, settings.database)
        watchdog = None
        if settings.redis_url:
            watchdog = StoreWatchdog.for_redis(
                settings.redis_url, timeout_s=settings.quota_timeout_ms / 1000
            )
            watchdog.start()
        outbox = make_outbox(
            database,
            settings.redis_url,
            claim_idle_ms=round(settings.outbox_claim_idle_s * 1000),
        )
        # With Redis, events go to a stream; while Redis is down, to the SQL database; while
        # both fail, to a file on this machine's disk.
        fallback = SqlOutbox(database) if settings.redis_url else None
        spool = Spool(settings.data_path / "spool.db")
        own_device = None
        if host.local:
            kind = settings.device_kind
            if kind is None:
                kind = await asyncio.to_thread(detect_device_kind)
            own_device = (kind, settings.device_cost_per_hour)
        usage = UsageRecorder(
            outbox, ledger, fallback=fallback, spool=spool, watchdog=watchdog, device=own_device
        )
        await usage.start()
        flushers = [Flusher(box, ledger) for box in (outbox, fallback) if box is not None]
        for flusher in flushers:
            flusher.start()
        app.state.on_api_error = _close_failed_call
        admission = Admission(
            store,
            telemetry,
            fail_open=settings.quota_fail_open,
            lease_s=settings.quota_lease_s,
            watchdog=watchdog,
            pricer=usage.reservation_usd,
            spool=spool if settings.redis_url else None,
            recorder=usage,
        )
        await admission.start()
        max_bytes = int(settings.cache_max_mb * 1024 * 1024)
        cache_store: CacheStore = (
            RedisCacheStore.from_url(settings.redis_url, max_bytes)
            if settings.redis_url
            else MemoryCacheStore(max_bytes)
        )
        cache = ResponseCache(
            cache_store,
            ttl_s=settings.cache_ttl_s,
            enabled=settings.cache,
            shared_models=shared_models,
        )
        policy = ServingControl(accounts, host, cache, settings, secret)
        catalog_sync = None
        if own_engines and host.local:
            catalog_sync = CatalogSync(
                accounts, host, settings.deployment, settings.data_path, on_change=policy.reapply
            )
            try:
                await catalog_sync.seed(settings.models_path, host.catalog)
            except Exception:
                logger.exception("could not seed the deployed catalog from the models file")
            await catalog_sync.start()
        await policy.start()
        telemetry.observe_engines(host.restarts)
        services_box["services"] = Services(
            settings=settings,
            host=host,
            telemetry=telemetry,
            accounts=accounts,
            admission=admission,
            authenticator=authenticator,
            secret=secret,
            usage=usage,
            cache=cache,
            policy=policy,
            catalog=catalog_sync,
            metrics=registry_for(host, cache),
        )
        # Several apps may share one host whose engines their caller runs (benchmarks).
        task = asyncio.create_task(host.start() if own_engines else asyncio.sleep(0))
        task.add_done_callback(started)
        try:
            yield
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            # Calls still running were closed when their tasks were cancelled: write their
            # events and settlements first (or spool them), then stop the engines.
            await policy.close()
            if catalog_sync is not None:
                await catalog_sync.close()
            await cache.close()
            await usage.close()
            await admission.close()
            if own_engines:
                await host.shutdown()
            for flusher in flushers:
                await flusher.stop(drain=True)
            await outbox.close()
            if fallback is not None:
                await fallback.close()
            await accounts.close()
            telemetry.shutdown()

    def provide_host() -> EngineHost:
        return host

    def provide_settings() -> Settings:
        return settings

    def provide_telemetry() -> Telemetry:
        return telemetry

    def provide_startup_error() -> str | None:
        return startup["error"]

    def provide_services() -> Services:
        return services_box["services"]

    middleware: list[Any] = [CallGuard]
    handlers: list[type] = [OpenAIController, HealthController, MetricsController]
    if settings.auth:
        handlers.extend([AdminController, BillingController])
        middleware.append(
            DefineMiddleware(
                AuthMiddleware, authenticator=authenticator, exclude=[r"^/(healthz|readyz)$"]
            )
        )
    return Litestar(
        route_handlers=handlers,
        middleware=middleware,
        dependencies={
            "services": Provide(provide_services, sync_to_thread=False, use_cache=True),
            "host": Provide(provide_host, sync_to_thread=False, use_cache=True),
            "settings": Provide(provide_settings, sync_to_thread=False, use_cache=True),
            "telemetry": Provide(provide_telemetry, sync_to_thread=False, use_cache=True),
            "startup_error": Provide(provide_startup_error, sync_to_thread=False),
        },
        exception_handlers=exception_handlers,
        before_send=[add_request_id],
        request_max_body_size=settings.max_body_bytes,
        lifespan=[lifespan],
        openapi_config=openapi_config(
            _version(), [name for spec in host.catalog for name in (spec.name, *spec.aliases)]
        ),
        logging_config=None,
    )


def _version() -> str:
    try:
        return importlib.metadata.version("tollgate")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree
        return "0.0.0"


def _close_failed_call(scope: Any, status_code: int, error: str) -> None:
    """An error answer of a model route: its call ends with that status."""
    call = call_of(scope)
    if call is not None:
        call.fail(status_code, error)
