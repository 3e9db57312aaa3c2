"""The OpenAPI document at ``/openapi.json`` says what the server really does.

Schemathesis fuzzes every operation of the document against a real gateway process, once
with a tenant's API key and once with the operator's admin token: no answer may be a 5xx,
and every answer must be documented (status code, content type, schema, headers); a stream's
events are checked one by one and must end with ``[DONE]``.

The gateway is its own, with a context of 96 tokens so that whatever ``max_tokens`` the
fuzzer asks for, a generation stays short; and with its own database and Redis database,
so that the prices, quotas and tenants the operator's run sets stay out of other tests.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import hypothesis
import pytest
import schemathesis
from hypothesis import strategies as st
from schemathesis import Case, GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core.transport import Response
from schemathesis.schemas import BaseSchema

from tests.conftest import Deployment, Gateway, start_gateway, stop_gateway, wait_ready
from tests.support.admin import Admin
from tests.support.postgres_server import PostgresServer

#: demo-chat with a tiny context: every generation the fuzzer asks for ends within 96 tokens.
TINY_CHAT = """
[[models]]
name = "demo-chat"
source = "{data_dir}/models/demo-chat"
kind = "chat"
aliases = ["demo"]

[models.engine]
max_model_len = 96
dtype = "float32"
kv_cache_gb = 0.25
max_num_seqs = 32
extra = { enforce_eager = true }
"""
MODELS = ("demo-chat", "demo")
#: The fields of model calls that these models honour: a body of only these, with plain
#: messages, reaches the engine instead of being refused.
HONOURED = frozenset(
    {
        "model",
        "prompt",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "n",
        "stop",
        "seed",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "logprobs",
        "top_logprobs",
        "stream",
        "stream_options",
        "ignore_eos",
        "top_k",
        "min_p",
        "repetition_penalty",
        "user",
    }
)
#: Examples per operation and caller; with two callers and 26 operations this bounds the run.
MAX_EXAMPLES = 100
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]
ROUTES = {
    ("post", "/v1/chat/completions"),
    ("post", "/v1/completions"),
    ("post", "/v1/embeddings"),
    ("get", "/v1/models"),
    ("get", "/v1/models/{model_id}"),
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("post", "/admin/v1/tenants"),
    ("get", "/admin/v1/tenants"),
    ("get", "/admin/v1/tenants/{tenant_id}"),
    ("patch", "/admin/v1/tenants/{tenant_id}"),
    ("delete", "/admin/v1/tenants/{tenant_id}"),
    ("post", "/admin/v1/tenants/{tenant_id}/keys"),
    ("get", "/admin/v1/tenants/{tenant_id}/keys"),
    ("get", "/admin/v1/keys/{key_id}"),
    ("delete", "/admin/v1/keys/{key_id}"),
    ("get", "/admin/v1/tenants/{tenant_id}/quota"),
    ("put", "/admin/v1/tenants/{tenant_id}/quota"),
    ("get", "/admin/v1/keys/{key_id}/quota"),
    ("put", "/admin/v1/keys/{key_id}/quota"),
    ("put", "/admin/v1/prices/{model}"),
    ("get", "/admin/v1/prices"),
    ("get", "/admin/v1/usage"),
    ("get", "/admin/v1/billing/invoices"),
    ("get", "/admin/v1/billing/export"),
    ("get", "/admin/v1/billing/dead-letters"),
    ("get", "/admin/v1/serving"),
    ("patch", "/admin/v1/serving"),
    ("get", "/admin/v1/models"),
    ("put", "/admin/v1/models/{name}"),
    ("delete", "/admin/v1/models/{name}"),
    ("put", "/admin/v1/models/{name}/adapters/{adapter}"),
    ("delete", "/admin/v1/models/{name}/adapters/{adapter}"),
    ("get", "/admin/v1/placement"),
    ("get", "/metrics"),
}


@dataclass(frozen=True)
class Caller:
    """Who calls, and the ids the fuzzer may use besides made-up ones."""

    token: str
    #: Tenant and key ids to read and change.
    tenant_id: str
    key_id: str
    #: Ids to delete (a tenant's deletion, a key's revocation).
    victim_tenant_id: str
    victim_key_id: str


@dataclass(frozen=True)
class Fuzzed:
    gateway: Gateway
    tenant: Caller
    operator: Caller

    def callers(self) -> dict[str, Caller]:
        return {"tenant": self.tenant, "operator": self.operator}


@pytest.fixture(scope="module")
def fuzzed(
    deployment: Deployment, postgres: PostgresServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fuzzed]:
    folder = tmp_path_factory.mktemp("openapi")
    catalog = folder / "tiny-chat.toml"
    catalog.write_text(TINY_CHAT)
    redis_url = re.sub(r"/0$", "/1", deployment.redis.url)
    with postgres.database() as database_url:
        gw = start_gateway(
            deployment,
            folder / "gateway.log",
            "--models",
            str(catalog),
            TOLLGATE_DATABASE_URL=database_url,
            TOLLGATE_REDIS_URL=redis_url,
        )
        try:
            wait_ready(gw)
            with httpx.Client(
                base_url=gw.base_url + "/admin/v1",
                headers={"authorization": f"Bearer {deployment.admin_token}"},
                timeout=30,
            ) as http:
                admin = Admin(http, deployment.secrets)
                # The tenant's own administrator: the /v1 routes and its part of /admin/v1.
                own = admin.tenant("openapi-tenant")
                key = admin.issue(own, "fuzzer", role="admin")
                spare = admin.issue(own, "spare")
                doomed = admin.issue(own, "doomed")
                # What the operator's run reads, changes and deletes.
                other = admin.tenant("openapi-target")
                other_key = admin.issue(other, "target")
                victim = admin.tenant("openapi-victim")
                victim_key = admin.issue(victim, "victim")
            yield Fuzzed(
                gateway=gw,
                tenant=Caller(key.value, own, spare.id, own, doomed.id),
                operator=Caller(deployment.admin_token, other, other_key.id, victim, victim_key.id),
            )
        finally:
            stop_gateway(gw)


@pytest.fixture(scope="module")
def document(fuzzed: Fuzzed) -> dict[str, Any]:
    answer = httpx.get(fuzzed.gateway.base_url + "/openapi.json", timeout=30)
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


def test_document_is_openapi_31_and_names_every_route(document: dict[str, Any]) -> None:
    assert document["openapi"].startswith("3.1.")
    schemathesis.openapi.from_dict(document).validate()  # against the OpenAPI 3.1 schema
    assert document["info"]["title"] == "Tollgate"
    routes = {(m, p) for p, item in document["paths"].items() for m in item}
    assert routes == ROUTES
    ids = [op["operationId"] for item in document["paths"].values() for op in item.values()]
    assert len(ids) == len(set(ids))
    bearer = document["components"]["securitySchemes"]["bearer"]
    assert (bearer["type"], bearer["scheme"]) == ("http", "bearer")
    for path, item in document["paths"].items():
        for op in item.values():
            public = path in ("/healthz", "/readyz")
            assert op["security"] == ([] if public else [{"bearer": []}]), path
            assert "500" not in op["responses"]
    chat = document["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    assert set(chat) == {"application/json", "text/event-stream"}


def test_document_is_public_and_made_once(fuzzed: Fuzzed) -> None:
    first = httpx.get(fuzzed.gateway.base_url + "/openapi.json", timeout=30)
    second = httpx.get(
        fuzzed.gateway.base_url + "/openapi.json", headers={"authorization": "Bearer nope"}
    )
    assert first.status_code == second.status_code == 200
    assert first.content == second.content
    assert first.headers["x-request-id"].startswith("req_")


def _schema(document: dict[str, Any], fuzzed: Fuzzed, caller: Caller) -> BaseSchema:
    config = schemathesis.Config.from_dict(
        {
            "seed": 1,
            "base-url": fuzzed.gateway.base_url,
            "request-timeout": 120,
            # Every event of a stream is read (the longest here: 16 choices of 96 tokens).
            "max-stream-events": 10_000,
            "generation": {
                "max-examples": MAX_EXAMPLES,
                "deterministic": True,
                "database": "none",
                "no-shrink": True,
                # The caller's token is sent as it is; made-up tokens are tested elsewhere.
                "with-security-parameters": False,
            },
            "phases": {"coverage": {"enabled": False}, "stateful": {"enabled": False}},
            "suppress-health-check": ["too_slow", "filter_too_much", "data_too_large"],
        }
    )
    schema = schemathesis.openapi.from_dict(document, config=config)

    def mixed(value: Any, *choices: Any) -> st.SearchStrategy[Any]:
        return st.sampled_from([value, *choices])

    @schema.hook
    def flatmap_body(context: Any, body: Any) -> st.SearchStrategy[Any]:
        """Model calls name a model served, and are trimmed to what it can serve, most of
        the time: made-up names and refused fields alone would never reach the engine."""
        if isinstance(body, dict) and "model" in body:
            named = ({**body, "model": name} for name in MODELS)
            servable = _servable(body)
            return mixed(body, *named, servable, servable)
        return st.just(body)

    @schema.hook
    def flatmap_path_parameters(context: Any, parameters: Any) -> st.SearchStrategy[Any]:
        """Admin routes get ids of objects that exist, besides made-up ones."""
        if not isinstance(parameters, dict):
            return st.just(parameters)
        deleting = context.operation is not None and context.operation.method.upper() == "DELETE"
        known = {
            "tenant_id": caller.victim_tenant_id if deleting else caller.tenant_id,
            "key_id": caller.victim_key_id if deleting else caller.key_id,
        }
        strategy: st.SearchStrategy[Any] = st.just(parameters)
        for name in parameters:
            if name in known:
                choices = [known[name]]
            elif name in ("model", "model_id"):
                choices = list(MODELS)
            else:
                continue

            def swap(current: Any, name: str = name, choices: list[str] = choices) -> Any:
                return mixed(current, *({**current, name: c} for c in choices))

            strategy = strategy.flatmap(swap)
        return strategy

    @schema.hook
    def flatmap_query(context: Any, query: Any) -> st.SearchStrategy[Any]:
        if isinstance(query, dict) and "tenant" in query:
            return mixed(query, {**query, "tenant": caller.tenant_id})
        return st.just(query)

    return schema


@pytest.fixture(scope="module")
def schemas(document: dict[str, Any], fuzzed: Fuzzed) -> dict[str, BaseSchema]:
    return {who: _schema(document, fuzzed, caller) for who, caller in fuzzed.callers().items()}


def _servable(body: dict[str, Any]) -> dict[str, Any]:
    servable = {k: v for k, v in body.items() if k in HONOURED}
    servable["model"] = MODELS[0]
    # What would be refused anyway (beyond the context, past `max_n`, bias on no token id)
    # is left out, so that the engine sees the rest.
    for field, most in (("max_tokens", 48), ("max_completion_tokens", 48), ("n", 4)):
        if not isinstance(servable.get(field), int) or servable[field] > most:
            servable.pop(field, None)
    bias = servable.get("logit_bias")
    if not isinstance(bias, dict) or not all(str(k).isdigit() for k in bias):
        servable.pop("logit_bias", None)
    if "messages" in body:
        messages = body["messages"]
        plain = (
            isinstance(messages, list)
            and messages
            and all(
                isinstance(m, dict)
                and m.get("role") in ("system", "developer", "user", "assistant")
                and isinstance(m.get("content"), str)
                and set(m) <= {"role", "content", "name"}
                for m in messages
            )
        )
        servable["messages"] = messages if plain else [{"role": "user", "content": "Hello"}]
    return servable


def _stream_ends_with_done(ctx: Any, response: Response, case: Case) -> bool | None:
    """A stream's last event is ``[DONE]``."""
    if not response.headers.get("content-type", [""])[0].startswith("text/event-stream"):
        return None
    events = [e for e in response.content.split(b"\n\n") if e]
    assert events, "an empty stream"
    assert events[-1] == b"data: [DONE]", response.content[-300:]
    return True


#: (caller, operation, status, content type) of every answer the fuzzer got.
ANSWERS: Counter[tuple[str, str, int, str]] = Counter()


def _call(case: Case, who: str, caller: Caller) -> None:
    response = case.call_and_validate(
        headers={"authorization": f"Bearer {caller.token}"},
        checks=CHECKS,
        additional_checks=[_stream_ends_with_done],
    )
    kind = response.headers.get("content-type", [""])[0].split(";")[0]
    ANSWERS[(who, case.operation.label, response.status_code, kind)] += 1


def _fuzz(schema: BaseSchema, method: str, path: str, who: str, caller: Caller) -> None:
    """The schema's examples of the operation, then generated cases: two valid to one
    invalid."""
    operation = schema[path][method.upper()]
    settings = schema.config.get_hypothesis_settings(operation=operation, phase="fuzzing")

    def run(strategy: st.SearchStrategy[Case], **changes: Any) -> None:
        @hypothesis.given(case=strategy)
        @hypothesis.settings(settings, **changes)
        def test(case: Case) -> None:
            _call(case, who, caller)

        test()

    for example in schema.get_strategies_from_examples(operation):
        run(example, max_examples=1)
    valid = operation.as_strategy(GenerationMode.POSITIVE)
    run(st.one_of(valid, valid, operation.as_strategy(GenerationMode.NEGATIVE)))


# One test per operation and caller, for the report (schemathesis' own lazy pytest
# integration does not run under pytest 9).
OPERATIONS = [
    pytest.param(m, p, id=f"{m.upper()} {p}") for m, p in sorted(ROUTES, key=lambda r: r[::-1])
]


@pytest.mark.parametrize(("method", "path"), OPERATIONS)
def test_as_a_tenant(
    method: str, path: str, schemas: dict[str, BaseSchema], fuzzed: Fuzzed
) -> None:
    _fuzz(schemas["tenant"], method, path, "tenant", fuzzed.tenant)


@pytest.mark.parametrize(("method", "path"), OPERATIONS)
def test_as_the_operator(
    method: str, path: str, schemas: dict[str, BaseSchema], fuzzed: Fuzzed
) -> None:
    _fuzz(schemas["operator"], method, path, "operator", fuzzed.operator)


def test_a_limited_keys_answers_conform(
    fuzzed: Fuzzed, schemas: dict[str, BaseSchema], deployment: Deployment
) -> None:
    """With limits, answers carry the ``x-ratelimit-*`` headers, and a 429 ``retry-after``."""
    with httpx.Client(
        base_url=fuzzed.gateway.base_url + "/admin/v1",
        headers={"authorization": f"Bearer {deployment.admin_token}"},
        timeout=30,
    ) as http:
        admin = Admin(http, deployment.secrets)
        key = admin.key(admin.tenant("openapi-limited", rpm=1, tpm=100_000))
    operation = schemas["tenant"]["/v1/completions"]["POST"]
    body = {"model": MODELS[0], "prompt": "Hello", "max_tokens": 1}
    answers = [
        operation.Case(body=body, media_type="application/json").call_and_validate(
            headers={"authorization": f"Bearer {key}"}, checks=CHECKS
        )
        for _ in range(2)
    ]
    assert [a.status_code for a in answers] == [200, 429]
    assert answers[0].headers["x-ratelimit-remaining-requests"] == ["0"]
    assert int(answers[1].headers["retry-after"][0]) >= 1


def test_the_fuzzer_reached_the_engine_and_the_objects() -> None:
    """Not only refusals: answers, streams and real objects were checked too."""
    if not ANSWERS:
        pytest.skip("the fuzzing tests did not run")
    ok = {(who, op, kind) for who, op, status, kind in ANSWERS if status < 300}
    for kind in ("application/json", "text/event-stream"):
        assert ("tenant", "POST /v1/chat/completions", kind) in ok, kind
        assert ("tenant", "POST /v1/completions", kind) in ok, kind
    for op in ("GET /admin/v1/tenants/{tenant_id}", "PUT /admin/v1/keys/{key_id}/quota"):
        assert ("operator", op, "application/json") in ok, op
        assert ("tenant", op, "application/json") in ok, op
