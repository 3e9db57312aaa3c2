"""Liveness and readiness."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Controller, Response, get
from litestar.di import NamedDependency

from gateway.api import openapi as docs
from gateway.api._shapes import Health, Readiness
from serving import EngineHost

__all__ = ["HealthController"]


class HealthController(Controller):
    @get(
        "/healthz",
        operation_class=docs.operation(
            "healthz",
            "Liveness: the process answers HTTP",
            tag="Health",
            answers={200: docs.json(Health, "Alive.")},
            public=True,
        ),
    )
    async def healthz(self) -> Response[bytes]:
        """Alive: the process answers HTTP."""
        return Response(content=b'{"status":"ok"}', media_type="application/json")

    @get(
        "/readyz",
        operation_class=docs.operation(
            "readyz",
            "Readiness: every engine is ready",
            tag="Health",
            answers={
                200: docs.json(Readiness, "Every model is ready or brought in on demand."),
                503: docs.json(Readiness, "An engine is starting, recovering or failed."),
            },
            public=True,
        ),
    )
    async def readyz(
        self, host: NamedDependency[EngineHost], startup_error: NamedDependency[str | None]
    ) -> Response[bytes]:
        """Ready once start-up is done and every model either takes requests or waits, cold or
        asleep, to be brought in on demand; the body has each engine's state, restarts and
        scheduler figures.

        ``status`` is ``ready``, ``starting`` (the first start), ``recovering`` (an engine
        died and is being restarted) or ``failed`` (start-up failed for good).
        """
        stats = host.stats()
        ready = startup_error is None and host.started and host.ready
        if ready:
            status = "ready"
        elif startup_error is not None:
            status = "failed"
        elif any(not s.ready and s.last_error is not None for s in stats.values()):
            status = "recovering"
        else:
            status = "starting"
        body: dict[str, Any] = {
            "status": status,
            "models": {name: msgspec.structs.asdict(s) for name, s in stats.items()},
        }
        if startup_error is not None:
            body["error"] = startup_error
        return Response(
            content=msgspec.json.encode(body),
            status_code=200 if ready else 503,
            media_type="application/json",
        )
