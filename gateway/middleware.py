"""Every HTTP response carries ``x-request-id`` (errors from routing included) and the
headers that admission left for it (``x-ratelimit-*``)."""

from __future__ import annotations

import secrets
from typing import Any

from litestar.types import Message, Scope

__all__ = ["add_request_id", "add_response_headers", "new_request_id", "request_id_of"]


def new_request_id() -> str:
    return "req_" + secrets.token_hex(12)


def request_id_of(scope: Scope | Any) -> str:
    """This request's id, made on first use.

    The id is made here, never taken from the client, so it can key records that must be
    unique (usage events, engine requests) without trusting the caller.
    """
    state = scope.setdefault("state", {})
    request_id = state.get("request_id")
    if request_id is None:
        request_id = state["request_id"] = new_request_id()
    return str(request_id)


def add_response_headers(scope: Scope | Any, headers: dict[str, str]) -> None:
    """Headers for whatever response this request ends with, error or not."""
    scope.setdefault("state", {}).setdefault("response_headers", {}).update(headers)


async def add_request_id(message: Message, scope: Scope) -> None:
    """A ``before_send`` hook: litestar calls it for every message, router errors included."""
    if message["type"] == "http.response.start":
        headers = list(message.get("headers", ()))
        headers.append((b"x-request-id", request_id_of(scope).encode()))
        extra: dict[str, str] | None = scope.get("state", {}).get("response_headers")
        if extra:
            present = {name.lower() for name, _ in headers}
            headers.extend(
                (k.encode(), v.encode()) for k, v in extra.items() if k.encode() not in present
            )
        message["headers"] = headers
