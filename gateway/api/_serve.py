"""The answer of a model call as an ASGI app of its own: engine work, disconnects, the end.

A model route validates and admits its request, then returns a `CallResponse`; the engine
work runs when litestar calls that response, inside one task group with a watcher of the
client's connection. When the client goes away (before the first byte, after the headers,
mid-stream), the watcher's `ClientGone` cancels the work: every engine request is aborted in
its own task, and the call is closed as aborted. When the work ends first, the watcher is
cancelled. Headers leave with the first output, so an error before it gets its own status.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from litestar import Request, Response
from litestar.response.base import ASGIResponse
from litestar.types import Receive, Scope, Send

from gateway.calls import Call, Outcome
from gateway.errors import APIError, InvalidRequest, ServiceUnavailable
from serving import EngineDead, EngineNotReady, InvalidPrompt, QueueFull, ServingError

__all__ = [
    "Body",
    "CallResponse",
    "ClientGone",
    "api_error",
    "json_response",
    "outcome_of",
    "send_error",
    "send_json",
]

logger = logging.getLogger(__name__)

JSON = b"application/json"
#: The work of one answer: sends the whole answer through ``send``.
Body = Callable[[Send], Awaitable[None]]


class ClientGone(Exception):
    """The client closed the connection before the answer ended."""


_encode = msgspec.json.Encoder().encode


def json_response(body: dict[str, Any], status_code: int = 200) -> Response[bytes]:
    """A litestar JSON response of ``body``."""
    return Response(content=_encode(body), media_type="application/json", status_code=status_code)


def api_error(exc: ServingError) -> APIError:
    """The OpenAI-shaped error of a serving error."""
    if isinstance(exc, InvalidPrompt):
        code = "context_length_exceeded" if exc.too_long else None
        return InvalidRequest(str(exc), param=exc.param, code=code)
    if isinstance(exc, EngineNotReady | EngineDead):
        code = "model_not_ready" if isinstance(exc, EngineNotReady) else "engine_unavailable"
        if isinstance(exc, QueueFull):
            code = "model_overloaded"
        retry = max(round(exc.retry_after_s or 1.0), 1)
        return ServiceUnavailable(
            str(exc),
            code=code,
            headers={"retry-after": str(retry), "retry-after-ms": str(retry * 1000)},
        )
    return APIError("The server had an error while processing your request.")


def outcome_of(exc: ServingError) -> Outcome:
    """How a call that failed with ``exc`` before any output ended."""
    return Outcome.REJECTED if isinstance(exc, EngineNotReady) else Outcome.ERROR


async def send_json(
    send: Send, status: int, body: bytes, headers: dict[str, str] | None = None
) -> None:
    """A whole JSON answer in two messages."""
    raw = [(b"content-type", JSON), (b"content-length", str(len(body)).encode())]
    if headers:
        raw.extend((k.encode(), v.encode()) for k, v in headers.items())
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def send_error(send: Send, error: APIError) -> None:
    """An OpenAI-shaped error answer."""
    await send_json(send, error.status_code, msgspec.json.encode(error.body()), error.headers)


async def _until_disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    raise ClientGone


class _Answer(ASGIResponse):
    """The ASGI side of a `CallResponse`."""

    def __init__(self, call: Call, work: Body) -> None:
        super().__init__(body=b"")
        self.call = call
        self.work = work
        self.started = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def tracked(message: Any) -> None:
            if message["type"] == "http.response.start":
                self.started = True
            await send(message)

        call = self.call
        try:
            async with asyncio.TaskGroup() as group:
                watcher = group.create_task(_until_disconnected(receive))
                await self.work(tracked)
                watcher.cancel()
        except* ClientGone:
            call.close(Outcome.ABORTED, "ClientGone")
        except* Exception as failed:  # a bug: answer 500 if nothing was sent yet
            logger.error("answer of %s failed", call.request_id, exc_info=failed.exceptions[0])
            call.close(Outcome.ERROR, type(failed.exceptions[0]).__name__)
            if not self.started:
                await send_error(
                    send, APIError("The server had an error while processing your request.")
                )
        finally:
            if not call.closed:  # cancelled from outside: the server is shutting down
                call.close(Outcome.ABORTED, "Cancelled")


class CallResponse(Response[bytes]):
    """What a model route returns: its answer, produced when litestar sends it."""

    def __init__(self, call: Call, work: Body) -> None:
        super().__init__(content=b"")
        self._call = call
        self._work = work

    def to_asgi_response(self, app: Any, request: Request[Any, Any, Any], **_: Any) -> ASGIResponse:
        return _Answer(self._call, self._work)
