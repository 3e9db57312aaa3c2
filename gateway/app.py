"""The litestar application factory."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from litestar import Litestar
from litestar.di import Provide

from gateway.api import HealthController, OpenAIController
from gateway.errors import exception_handlers
from gateway.middleware import add_request_id
from gateway.settings import Settings
from gateway.telemetry import Telemetry, setup_telemetry
from serving import EngineHost, load_catalog

__all__ = ["create_app"]

logger = logging.getLogger(__name__)


def create_app(
    settings: Settings,
    *,
    host: EngineHost | None = None,
    telemetry: Telemetry | None = None,
    on_ready: Callable[[], None] | None = None,
    on_startup_failure: Callable[[BaseException], None] | None = None,
) -> Litestar:
    """Build the gateway app; its engines start in the background once the app starts.

    ``/healthz`` answers at once, ``/readyz`` only when every engine is up.

    Raises:
        CatalogError: the models file is wrong; the message names the entry.
    """
    if host is None:
        host = EngineHost(load_catalog(settings.models_path, settings.data_path))
    telemetry = telemetry or setup_telemetry()
    startup: dict[str, str | None] = {"error": None}

    def started(task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            logger.info("all models ready: %s", ", ".join(s.name for s in host.catalog))
            if on_ready is not None:
                on_ready()
            return
        startup["error"] = f"{type(exc).__name__}: {exc}"
        logger.error("engine start-up failed: %s", startup["error"])
        if on_startup_failure is not None:
            on_startup_failure(exc)

    @asynccontextmanager
    async def lifespan(_: Litestar) -> AsyncIterator[None]:
        task = asyncio.create_task(host.start())
        task.add_done_callback(started)
        try:
            yield
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await host.shutdown()
            telemetry.shutdown()

    def provide_host() -> EngineHost:
        return host

    def provide_settings() -> Settings:
        return settings

    def provide_telemetry() -> Telemetry:
        return telemetry

    def provide_startup_error() -> str | None:
        return startup["error"]

    return Litestar(
        route_handlers=[OpenAIController, HealthController],
        dependencies={
            "host": Provide(provide_host, sync_to_thread=False, use_cache=True),
            "settings": Provide(provide_settings, sync_to_thread=False, use_cache=True),
            "telemetry": Provide(provide_telemetry, sync_to_thread=False, use_cache=True),
            "startup_error": Provide(provide_startup_error, sync_to_thread=False),
        },
        exception_handlers=exception_handlers,
        before_send=[add_request_id],
        request_max_body_size=settings.max_body_bytes,
        lifespan=[lifespan],
        openapi_config=None,
        logging_config=None,
    )
