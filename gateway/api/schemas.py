"""Request bodies of the OpenAI-compatible API, validated by msgspec.

No field is dropped silently. Each field OpenAI's API defines is either honoured, or
informational and kept without an effect on the output (``user``, ``metadata``,
``safety_identifier``, ``prompt_cache_key``), or refused with a 400 naming it when it asks for
something these models cannot do (``tools``, ``audio``, ``reasoning_effort``, ...; an empty or
null value asks for nothing and passes). A field the API does not define is a 400 too
(``Unrecognized request argument supplied``), as OpenAI answers it.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, TypeVar

import msgspec

__all__ = [
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "ContentPart",
    "EmbeddingRequest",
    "JsonObjectFormat",
    "JsonSchemaFormat",
    "ResponseFormat",
    "StreamOptions",
    "TextFormat",
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


class StreamOptions(msgspec.Struct, forbid_unknown_fields=True):
    include_usage: bool | None = None
    #: Padding that hides the length of each event: not offered (refused when true).
    include_obfuscation: bool | None = None


class ContentPart(msgspec.Struct, forbid_unknown_fields=True):
    """One part of a message's content; only text parts are served."""

    type: str
    text: str | None = None
    image_url: Any = None
    input_audio: Any = None
    file: Any = None
    refusal: str | None = None


class ChatMessage(msgspec.Struct, forbid_unknown_fields=True):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    #: An assistant's earlier refusal; kept out of the prompt.
    refusal: str | None = None
    tool_calls: list[Any] | None = None
    tool_call_id: str | None = None
    function_call: Any = None
    audio: Any = None

    def text(self) -> str:
        """The content as one string.

        Raises:
            ValueError: the message needs tools or carries content other than text.
        """
        if self.role in ("tool", "function") or self.tool_calls or self.function_call:
            raise ValueError("tool messages and tool calls need a model with tool support")
        if self.audio is not None:
            raise ValueError("audio in messages is not supported")
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


class JsonSchema(msgspec.Struct, forbid_unknown_fields=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    description: str | None = None
    #: The JSON Schema the output must match (an empty one allows any JSON value).
    schema: dict[str, Any] | None = None
    strict: bool | None = None


class TextFormat(msgspec.Struct, tag_field="type", tag="text", forbid_unknown_fields=True):
    """Free text (the default)."""


class JsonObjectFormat(
    msgspec.Struct, tag_field="type", tag="json_object", forbid_unknown_fields=True
):
    """Any JSON object."""


class JsonSchemaFormat(
    msgspec.Struct, tag_field="type", tag="json_schema", forbid_unknown_fields=True
):
    """JSON that matches ``json_schema.schema``."""

    json_schema: JsonSchema


ResponseFormat = TextFormat | JsonObjectFormat | JsonSchemaFormat
#: OpenAI's ``logit_bias``: token ids (as strings) to a bias in [-100, 100].
LogitBias = dict[str, Annotated[float, msgspec.Meta(ge=-100, le=100)]]


class _Sampling(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    model: str
    temperature: Temperature | None = None
    top_p: TopP | None = None
    n: PositiveInt = 1
    stop: Stop | None = None
    seed: int | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: LogitBias | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    #: Who the end user is; kept for abuse reports, never shown to the model.
    user: str | None = None
    #: vLLM's extensions: keep generating past end-of-sequence up to ``max_tokens``; sample
    #: among the ``top_k`` likeliest tokens; drop tokens below ``min_p`` times the likeliest;
    #: penalise repeats multiplicatively.
    ignore_eos: bool = False
    top_k: Annotated[int, msgspec.Meta(ge=-1)] | None = None
    min_p: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] | None = None
    repetition_penalty: Annotated[float, msgspec.Meta(gt=0.0, le=2.0)] | None = None

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def refused(self) -> tuple[str, str] | None:
        """The first field set to something this server cannot honour: (field, why)."""
        if self.stream_options is not None and self.stream_options.include_obfuscation:
            return "stream_options", "include_obfuscation is not supported"
        return None


class ChatCompletionRequest(_Sampling, kw_only=True):
    messages: Annotated[list[ChatMessage], msgspec.Meta(min_length=1)]
    max_tokens: PositiveInt | None = None
    max_completion_tokens: PositiveInt | None = None
    logprobs: bool | None = False
    top_logprobs: Annotated[int, msgspec.Meta(ge=0, le=20)] | None = None
    response_format: ResponseFormat | None = None
    #: Informational: kept with the request, no effect on the output.
    metadata: dict[str, str] | None = None
    safety_identifier: str | None = None
    #: A hint for routing to a warm prefix cache; prefixes are cached anyway.
    prompt_cache_key: str | None = None
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    service_tier: str | None = None
    store: bool | None = None
    modalities: list[str] | None = None
    # Fields that need what these models do not have: refused unless empty.
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    web_search_options: Any = None
    moderation: Any = None
    prompt_cache_options: Any = None

    def refused(self) -> tuple[str, str] | None:
        unsupported = super().refused()
        if unsupported is not None:
            return unsupported
        if self.tools:
            return "tools", "this model has no tool support (no tool parser is configured)"
        if self.tool_choice not in (None, "none", "auto"):
            return "tool_choice", "this model has no tool support"
        if self.functions or self.function_call not in (None, "none", "auto"):
            field = "functions" if self.functions else "function_call"
            return field, "this model has no tool support"
        if self.store:
            return "store", "stored completions are not supported"
        if self.service_tier not in (None, "auto", "default"):
            return "service_tier", f"service tier {self.service_tier!r} is not offered"
        if self.modalities not in (None, [], ["text"]):
            return "modalities", "only text output is supported"
        if self.prompt_cache_retention == "24h":
            return "prompt_cache_retention", "extended prompt cache retention is not offered"
        for field in (
            "audio",
            "prediction",
            "reasoning_effort",
            "verbosity",
            "web_search_options",
            "moderation",
            "prompt_cache_options",
        ):
            if getattr(self, field) is not None:
                return field, f"{field} is not supported by this model"
        return None


class CompletionRequest(_Sampling, kw_only=True):
    prompt: TextOrTokens
    max_tokens: PositiveInt | None = 16
    logprobs: Annotated[int, msgspec.Meta(ge=0, le=5)] | None = None
    echo: bool | None = False
    suffix: str | None = None
    best_of: PositiveInt | None = None


class EmbeddingRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
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
