"""Errors in the OpenAI shape: ``{"error": {"message", "type", "param", "code"}}``.

Exceptions::

    APIError                      an error the client sees, with its status code
    ├── InvalidRequest            400: the request is malformed; fix it before retrying
    ├── ModelNotFound             404: no such model
    ├── Unauthenticated           401: no key, a malformed, unknown, revoked or expired key
    ├── PermissionDenied          403: the key may not do this (admin route, model not allowed)
    ├── NotFound                  404: no such object, or not one the caller may see
    ├── RequestTooLarge           413: the body is larger than allowed
    ├── Conflict                  409: the change clashes with the current state
    ├── RateLimited               429: a rate limit or a budget is spent; retry after `retry-after`
    └── ServiceUnavailable        503: overloaded or a dependency is down; retry later
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException
from litestar.types import ExceptionHandlersMap

__all__ = [
    "APIError",
    "Conflict",
    "InvalidRequest",
    "ModelNotFound",
    "NotFound",
    "PermissionDenied",
    "RateLimited",
    "RequestTooLarge",
    "ServiceUnavailable",
    "Unauthenticated",
    "error_response",
    "exception_handlers",
]

logger = logging.getLogger(__name__)


class APIError(Exception):
    """An error that reaches the client as an OpenAI error object."""

    status_code = 500
    type = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers
        if code is not None:
            self.code = code

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequest(APIError):
    status_code = 400
    type = "invalid_request_error"


class ModelNotFound(APIError):
    status_code = 404
    type = "invalid_request_error"
    code = "model_not_found"

    def __init__(self, model: str) -> None:
        super().__init__(
            f"The model `{model}` does not exist or you do not have access to it.", param="model"
        )


class Unauthenticated(APIError):
    status_code = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class PermissionDenied(APIError):
    status_code = 403
    type = "permission_error"
    code = "permission_denied"


class NotFound(APIError):
    status_code = 404
    type = "invalid_request_error"
    code = "not_found"


class Conflict(APIError):
    status_code = 409
    type = "invalid_request_error"
    code = "conflict"


class RateLimited(APIError):
    """429: ``rate_limit_exceeded`` (a rate limit) or ``insufficient_quota`` (a budget)."""

    status_code = 429

    def __init__(self, message: str, *, budget: bool, headers: dict[str, str]) -> None:
        code = "insufficient_quota" if budget else "rate_limit_exceeded"
        super().__init__(message, code=code, headers=headers)
        self.type = "insufficient_quota" if budget else "requests"


class RequestTooLarge(APIError):
    status_code = 413
    type = "invalid_request_error"
    code = "request_too_large"


class ServiceUnavailable(APIError):
    status_code = 503
    type = "server_error"
    code = "service_unavailable"


_HTTP_TYPES = {
    401: ("authentication_error", "invalid_api_key"),
    403: ("permission_error", None),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
}


def error_response(exc: APIError, headers: dict[str, str] | None = None) -> Response[bytes]:
    return Response(
        content=msgspec.json.encode(exc.body()),
        status_code=exc.status_code,
        media_type="application/json",
        headers=headers,
    )


def _failed(request: Request[Any, Any, Any], status_code: int, exc: BaseException) -> None:
    """Tell the app a request ends with an error (it closes the request's model call)."""
    hook = getattr(request.app.state, "on_api_error", None)
    if hook is not None:
        hook(request.scope, status_code, type(exc).__name__)


def _api_error(request: Request[Any, Any, Any], exc: APIError) -> Response[bytes]:
    _failed(request, exc.status_code, exc)
    return error_response(exc, headers=exc.headers)


def _http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[bytes]:
    status = exc.status_code
    kind, code = _HTTP_TYPES.get(
        status, ("invalid_request_error" if status < 500 else "server_error", None)
    )
    err = APIError(exc.detail or "error")
    err.status_code, err.type, err.code = status, kind, code
    if status == 413:
        err.message = "The request body is larger than this server accepts."
    _failed(request, status, exc)
    return error_response(err, headers=dict(exc.headers or {}))


def _unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    _failed(request, 500, exc)
    return error_response(APIError("The server had an error while processing your request."))


exception_handlers: ExceptionHandlersMap = {
    APIError: _api_error,
    HTTPException: _http_error,
    Exception: _unexpected,
}
