"""The OpenAPI 3.1 document, served at ``GET /openapi.json``.

litestar's generator walks the routes and gives paths, path and query parameters and
operation ids. What it cannot see, because handlers read and validate their own bodies (for
OpenAI-shaped errors) and answer pre-encoded bytes, each route's decorator states through
``operation_class=operation(...)``: the request body, every status the route answers with
its media types, schema and headers, and whether a bearer token is needed. Schemas are
msgspec's own (`msgspec.json.schema_components`): of the request Structs the handlers decode
with, so the document takes exactly what the server takes, and of the response Structs of
`gateway.api._shapes`.

The document is built on its first request and kept as bytes: requests cost nothing more.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from http import HTTPStatus
from typing import Any, ClassVar

import msgspec
from litestar import Request, Router
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin
from litestar.openapi.spec import Operation, Tag

from gateway.api._shapes import ErrorResponse

__all__ = [
    "ATTACHMENT",
    "AUTHENTICATED",
    "COST",
    "Answer",
    "binary",
    "json",
    "json_or_stream",
    "openapi_config",
    "operation",
]

_SCHEMAS = "#/components/schemas/"
#: Every Struct an operation names; the document's ``components.schemas`` are made of these.
_TYPES: dict[str, type[Any]] = {}
_SECURITY_SCHEME = "bearer"
#: A decimal amount as clients send it; the server also takes a JSON number.
_DECIMAL = {
    "anyOf": [
        {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?$", "examples": ["12.50"]},
        {"type": "number", "minimum": 0},
    ]
}
_DIGITS = {"type": "string", "pattern": "^[0-9]+$"}
_RESET = {"type": "string", "pattern": "^([0-9]+ms|([0-9]+m)?[0-9]+s)$"}


def _ref(kind: type[Any]) -> dict[str, str]:
    name = kind.__name__
    known = _TYPES.setdefault(name, kind)
    if known is not kind:
        raise TypeError(f"two types named {name} in the OpenAPI document")
    return {"$ref": _SCHEMAS + name}


#: Header objects by component name; answers refer to them.
_HEADERS: dict[str, dict[str, Any]] = {}


def _header(
    name: str,
    description: str,
    schema: Mapping[str, Any],
    *,
    required: bool = False,
    component: str | None = None,
) -> dict[str, dict[str, str]]:
    """``{name: a reference}`` to a header object kept under ``components.headers``."""
    component = component or name
    _HEADERS[component] = {"description": description, "required": required, "schema": schema}
    return {name: {"$ref": "#/components/headers/" + component}}


_REQUEST_ID = _header(
    "x-request-id",
    "The request's id, made by the server.",
    {"type": "string", "pattern": "^req_[0-9a-f]{24}$"},
    required=True,
)
_RATE_LIMITS = {
    name: ref
    for unit in ("requests", "tokens")
    for what, text in (
        ("limit", "its size"),
        ("remaining", "what is left"),
        ("reset", "when it is back in full"),
    )
    for name, ref in _header(
        f"x-ratelimit-{what}-{unit}",
        f"The tightest {unit} limit of the key and its tenant: {text}; only for limited keys.",
        _RESET if what == "reset" else _DIGITS,
    ).items()
}
_RETRY = "Seconds to wait before retrying."
_RETRY_MS = "Milliseconds to wait before retrying."
_RETRY_AFTER = {
    **_header("retry-after", _RETRY, _DIGITS),
    **_header("retry-after-ms", _RETRY_MS, _DIGITS),
}
_RETRY_AFTER_REQUIRED = {
    **_header("retry-after", _RETRY, _DIGITS, required=True, component="retry-after.required"),
    **_header(
        "retry-after-ms", _RETRY_MS, _DIGITS, required=True, component="retry-after-ms.required"
    ),
}
COST = _header(
    "x-tollgate-cost-usd",
    "What the call cost, in USD (non-streamed answers; a stream's is in its last chunk).",
    {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?$"},
)
CACHE = _header(
    "x-tollgate-cache",
    "How a deterministic request (temperature 0, or a seed) was answered: `miss` (the engine "
    "generated it), `shared` (it followed an identical request's generation in progress), "
    "`hit` (from the response cache), `bypass` (`Cache-Control: no-store`). Absent for "
    "sampled requests.",
    {"type": "string", "enum": ["hit", "miss", "shared", "bypass"]},
)
GPU_MS = _header(
    "x-tollgate-gpu-ms",
    "Engine milliseconds the answer took (non-streamed answers; a stream's is in its usage "
    "chunk): its share of each engine step it was scheduled in, by weighted tokens. Zero "
    "for an answer from the response cache.",
    {"type": "string", "pattern": r"^[0-9]+\.[0-9]{3}$"},
)
ATTACHMENT = _header(
    "content-disposition",
    "The file's name.",
    {"type": "string", "pattern": '^attachment; filename="[^"]+"$'},
    required=True,
)
_ERRORS = {
    400: "The request is malformed or asks for what this server cannot do; `param` names "
    "the field.",
    401: "No API key, or a malformed, unknown, revoked or expired one (`invalid_api_key`).",
    403: "The caller may not do this (`permission_denied`, `model_not_allowed`, "
    "`admin_token_not_allowed`).",
    404: "No such model or object, or none the caller may see.",
    409: "The change conflicts with what is stored.",
    413: "The body is larger than this server accepts (`request_too_large`).",
    429: "A rate limit (`rate_limit_exceeded`) or a budget (`insufficient_quota`) is spent.",
    503: "An engine is not ready or a dependency (accounts database, quota store) is down; "
    "retry later.",
}
#: Every route that needs a caller can answer these.
AUTHENTICATED = (401, 503)
_TAGS = [
    Tag(name="OpenAI", description="The OpenAI-compatible API; a tenant's API key."),
    Tag(name="Admin", description="Tenants, keys and quotas; the admin token or an admin key."),
    Tag(name="Billing", description="Prices, usage, invoices and exports."),
    Tag(name="Health", description="Liveness and readiness; no token."),
]


@dataclass(frozen=True)
class Answer:
    """One documented response: its description, content per media type, extra headers."""

    description: str
    content: Mapping[str, Mapping[str, Any]] | None = None
    headers: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    #: Kept under this name in ``components.responses``, and referred to.
    shared: str | None = None

    def to_schema(self, extra_headers: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
        if self.shared is not None:
            return {"$ref": "#/components/responses/" + self.shared}
        headers = {**_REQUEST_ID, **extra_headers, **self.headers}
        body: dict[str, Any] = {"description": self.description, "headers": headers}
        if self.content is not None:
            body["content"] = {kind: dict(media) for kind, media in self.content.items()}
        return body


def json(kind: type[Any], description: str, **headers: Mapping[str, Any]) -> Answer:
    """A JSON answer whose body is ``kind``."""
    return Answer(description, {"application/json": {"schema": _ref(kind)}}, headers)


def json_or_stream(answer: type[Any], chunk: type[Any], description: str) -> Answer:
    """A model answer: ``answer`` as JSON, or with ``stream: true`` server-sent events.

    Each event's ``data`` is a ``chunk`` as JSON (or an error object when the engine fails
    mid-stream), and the last one is ``[DONE]``. As OpenAPI 3.1 has no item schema for
    event streams, the event stream's ``schema`` describes one event (as 3.2's
    ``itemSchema`` does).
    """
    data = {
        "type": "string",
        "if": {"const": "[DONE]"},
        "then": True,
        "else": {
            "contentMediaType": "application/json",
            "contentSchema": {"anyOf": [_ref(chunk), _ref(ErrorResponse)]},
        },
    }
    event = {
        "type": "object",
        "properties": {"event": {"const": "message"}, "data": data},
        "required": ["data"],
    }
    return Answer(
        description,
        {
            "application/json": {"schema": _ref(answer)},
            "text/event-stream": {"schema": event},
        },
        {**COST, **CACHE, **GPU_MS},
    )


def binary(description: str, media_types: Sequence[str], **headers: Mapping[str, Any]) -> Answer:
    """A download, as any of ``media_types``."""
    content = {kind: {"schema": {"type": "string"}} for kind in media_types}
    return Answer(description, content, headers)


def _error(status: int) -> Answer:
    headers: Mapping[str, Mapping[str, Any]] = {}
    if status == 429:
        headers = {**_RETRY_AFTER_REQUIRED, **_RATE_LIMITS}
    elif status == 503:
        headers = _RETRY_AFTER
    answer = json(ErrorResponse, _ERRORS[status], **headers)
    name = HTTPStatus(status).phrase.title().replace(" ", "")
    _RESPONSES[name] = answer.to_schema({})
    return replace(answer, shared=name)


#: The error answers, kept once under ``components.responses``.
_RESPONSES: dict[str, dict[str, Any]] = {}
_ERROR_ANSWERS = {status: _error(status) for status in _ERRORS}


@dataclass(frozen=True)
class _Spec:
    operation_id: str
    summary: str
    tag: str
    body: type[Any] | None
    answers: Mapping[int, Answer]
    public: bool
    metered: bool
    params: Mapping[str, Mapping[str, Any]]
    examples: Mapping[str, Any]

    def apply(self, generated: dict[str, Any]) -> dict[str, Any]:
        """litestar's operation, completed."""
        schema = {
            "tags": [self.tag],
            "summary": self.summary,
            "operationId": self.operation_id,
            **{k: v for k, v in generated.items() if k in ("description", "parameters")},
        }
        parameters = [self._parameter(p) for p in generated.get("parameters", ())]
        if parameters:
            schema["parameters"] = parameters
        if self.body is not None:
            media: dict[str, Any] = {"schema": _ref(self.body)}
            if self.examples:
                media["examples"] = {k: {"value": v} for k, v in self.examples.items()}
            schema["requestBody"] = {"required": True, "content": {"application/json": media}}
        extra = _RATE_LIMITS if self.metered else {}
        schema["responses"] = {
            str(status): answer.to_schema(extra) for status, answer in sorted(self.answers.items())
        }
        schema["security"] = [] if self.public else [{_SECURITY_SCHEME: []}]
        return schema

    def _parameter(self, generated: Mapping[str, Any]) -> dict[str, Any]:
        parameter = {k: v for k, v in generated.items() if k not in ("deprecated", "allowReserved")}
        schema = dict(parameter.get("schema", {}))
        # An optional query parameter is left out, never sent as null.
        branches = schema.get("oneOf")
        if branches and {"type": "null"} in branches:
            rest = [b for b in branches if b != {"type": "null"}]
            schema = rest[0] if len(rest) == 1 else {"oneOf": rest}
        if parameter.get("in") == "path":
            schema.setdefault("minLength", 1)
        override = dict(self.params.get(parameter["name"], {}))
        if "description" in override:
            parameter["description"] = override.pop("description")
        parameter["schema"] = {**schema, **override}
        return parameter


def operation(
    operation_id: str,
    summary: str,
    *,
    tag: str,
    answers: Mapping[int, Answer],
    errors: Iterable[int] = (),
    body: type[Any] | None = None,
    public: bool = False,
    metered: bool = False,
    params: Mapping[str, Mapping[str, Any]] | None = None,
    examples: Mapping[str, Any] | None = None,
) -> type[Operation]:
    """The ``operation_class`` of one route.

    Args:
        operation_id: The operation's id.
        summary: One line on what it does.
        tag: Its group.
        answers: The successful answers by status.
        errors: The error statuses it can answer (an OpenAI error object each); those of
            authentication are added unless ``public``.
        body: The Struct its handler decodes the JSON body with.
        public: No token is needed.
        metered: A model call: its answers may carry the ``x-ratelimit-*`` headers.
        params: Per parameter: a ``description`` and schema keywords to add.
        examples: Request bodies by name, to show (and to try first).
    """
    statuses = set(errors) | (set() if public else set(AUTHENTICATED))
    spec = _Spec(
        operation_id=operation_id,
        summary=summary,
        tag=tag,
        body=body,
        answers={**{s: _ERROR_ANSWERS[s] for s in statuses}, **answers},
        public=public,
        metered=metered,
        params=params or {},
        examples=examples or {},
    )
    if body is not None:
        _ref(body)  # registered now: the document is made from what the routes name
    name = f"{operation_id[0].upper()}{operation_id[1:]}Operation"
    return type(name, (_Documented,), {"spec": spec})


class _Documented(Operation):
    """An operation as litestar made it, completed by its route's `_Spec`."""

    spec: ClassVar[_Spec]

    def to_schema(self) -> dict[str, Any]:
        return self.spec.apply(super().to_schema())


def _components(models: Sequence[str]) -> dict[str, Any]:
    _, schemas = msgspec.json.schema_components(
        list(_TYPES.values()), ref_template=_SCHEMAS + "{name}"
    )
    missing = set(_TYPES) - set(schemas)
    if missing:
        raise TypeError(f"msgspec named these schemas otherwise: {sorted(missing)}")
    for schema in schemas.values():
        for name, prop in schema.get("properties", {}).items():
            _refine(name, prop, models)
    return schemas


def _refine(name: str, prop: dict[str, Any], models: Sequence[str]) -> None:
    """What msgspec's schemas leave out: decimals, times in unions, the models served."""
    for branch in prop.get("anyOf", ()):
        _refine(name, branch, models)
    if prop.get("format") == "decimal":
        kept = {k: v for k, v in prop.items() if k in ("default", "description")}
        prop.clear()
        prop.update(_DECIMAL, **kept)
    elif prop.get("type") == "string" and name in ("expires_at", "effective_from"):
        # msgspec writes `int | datetime` as any string; the server takes RFC 3339 times.
        prop["format"] = "date-time"
    elif name == "model" and prop.get("type") == "string" and models:
        prop["examples"] = list(models)


class _Document(JsonRenderPlugin):
    """The document as JSON, finished and encoded once."""

    def __init__(self, models: Sequence[str]) -> None:
        super().__init__(path=["/", "/openapi.json"])
        self.models = tuple(models)
        self._body: bytes | None = None

    def render(self, request: Request[Any, Any, Any], openapi_schema: dict[str, Any]) -> bytes:
        if self._body is None:
            document = dict(openapi_schema)
            components = dict(document.get("components") or {})
            components["schemas"] = {
                **components.get("schemas", {}),
                **_components(self.models),
            }
            components["securitySchemes"] = {
                _SECURITY_SCHEME: {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A tenant's API key (`tg_...`) for `/v1`; the admin token "
                    "or an admin-role key for `/admin/v1`.",
                }
            }
            components["headers"] = dict(sorted(_HEADERS.items()))
            components["responses"] = dict(sorted(_RESPONSES.items()))
            document["components"] = components
            document["paths"] = dict(sorted(document.get("paths", {}).items()))
            for item in document["paths"].values():
                for op in item.values():
                    for parameter in op.get("parameters", ()):
                        if parameter["name"] in ("model", "model_id") and self.models:
                            parameter["schema"]["examples"] = list(self.models)
            self._body = msgspec.json.encode(document)
        return self._body


def openapi_config(version: str, models: Iterable[str] = ()) -> OpenAPIConfig:
    """The app's OpenAPI configuration: the document alone, at ``/openapi.json``, public.

    Args:
        version: The API's version.
        models: The names (and aliases) of the models served, shown as examples.
    """
    return OpenAPIConfig(
        title="Tollgate",
        version=version,
        description="An OpenAI-compatible inference gateway, with its admin and billing API.",
        tags=_TAGS,
        render_plugins=[_Document(list(models))],
        # litestar adds a not-found page under its router's path; this keeps it under
        # /openapi.json/, where no route of the API lives.
        openapi_router=Router(
            "/openapi.json",
            route_handlers=[],
            include_in_schema=False,
            opt={"exclude_from_auth": True},
        ),
    )
