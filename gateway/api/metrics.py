"""``GET /metrics``: the gateway's figures in Prometheus text format (the operator's token)."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, Response, get
from litestar.di import NamedDependency

from gateway.api import openapi as docs
from gateway.auth import principal_of
from gateway.errors import PermissionDenied
from gateway.metrics import CONTENT_TYPE, render
from gateway.services import Services

__all__ = ["MetricsController"]


class MetricsController(Controller):
    @get(
        "/metrics",
        operation_class=docs.operation(
            "metrics",
            "The gateway's metrics, Prometheus text format (operator only)",
            tag="Health",
            answers={
                200: docs.binary("The metrics.", [CONTENT_TYPE.split(";")[0]]),
            },
            errors=(403,),
        ),
    )
    async def metrics(
        self, request: Request[Any, Any, Any], services: NamedDependency[Services]
    ) -> Response[bytes]:
        principal = principal_of(request.scope)
        if principal is not None and not principal.operator:
            raise PermissionDenied("Only the operator may read the metrics.")
        return Response(content=render(services.metrics), media_type=CONTENT_TYPE)
