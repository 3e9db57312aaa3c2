"""Request bodies of the OpenAI-compatible API, validated by msgspec.

Fields the API defines and Tollgate does not act on (``user``, ``metadata``, ...) are accepted
and ignored, as OpenAI's own server does with fields that do not apply; fields whose meaning
Tollgate cannot honour are refused with a 400 rather than silently dropped.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal, TypeVar

import msgspec

__all__ = [
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "ContentPart",
    "EmbeddingRequest",
    "StreamOptions",
    "TextOrTokens",
    "decode",
]

Temperature = Annotated[float, msgspec.Meta(ge=0.0, le=2.0)]
TopP = Annotated[float, msgspec.Meta(gt=0.0, le=1.0)]
Penalty = Annotated[float, msgspec.Meta(ge=-2.0, le=2.0)]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
Stop = str | Annotated[list[str], msgspec.Meta(max_length=4)]
T = TypeVar("T")
#: A string, strings, a token array or token arrays; homogeneity is checked after decoding
#: (msgspec unions hold one array type at most).
TextOrTokens = str | list[str | int | list[int]]


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class ContentPart(msgspec.Struct):
    type: str
    text: str | None = None


class ChatMessage(msgspec.Struct):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise ValueError(f"content parts of type {part.type!r} are not supported")
            parts.append(part.text)
        return "".join(parts)


class _Sampling(msgspec.Struct, kw_only=True):
    model: str
    temperature: Temperature | None = None
    top_p: TopP | None = None
    n: PositiveInt = 1
    stop: Stop | None = None
    seed: int | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    #: vLLM's extension: keep generating past end-of-sequence up to ``max_tokens``.
    ignore_eos: bool = False

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class ChatCompletionRequest(_Sampling, kw_only=True):
    messages: Annotated[list[ChatMessage], msgspec.Meta(min_length=1)]
    max_tokens: PositiveInt | None = None
    max_completion_tokens: PositiveInt | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, msgspec.Meta(ge=0, le=20)] | None = None


class CompletionRequest(_Sampling, kw_only=True):
    prompt: TextOrTokens
    max_tokens: PositiveInt | None = 16
    logprobs: Annotated[int, msgspec.Meta(ge=0, le=5)] | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: PositiveInt | None = None


class EmbeddingRequest(msgspec.Struct, kw_only=True):
    model: str
    input: TextOrTokens
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: PositiveInt | None = None
    user: str | None = None


_UNKNOWN_FIELD = re.compile(r"unknown field `([^`]+)`")


def decode(body: bytes, kind: type[T]) -> T:
    """Decode and validate a JSON body.

    Raises:
        InvalidRequest: naming the offending field.
    """
    from gateway.errors import InvalidRequest

    if not body:
        raise InvalidRequest("The request body is empty; send a JSON object.")
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        message = str(exc)
        unknown = _UNKNOWN_FIELD.search(message)
        if unknown:  # a closed body (admin routes) got a field it does not take
            field = unknown.group(1)
            raise InvalidRequest(
                f"Unrecognized request argument supplied: {field}", param=field
            ) from exc
        param = None
        if " - at `$." in message:
            message, _, path = message.partition(" - at `$.")
            param = path.rstrip("`")
        raise InvalidRequest(f"Invalid request: {message}", param=param) from exc
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}") from exc
