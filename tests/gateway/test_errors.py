"""Bad input gets OpenAI-shaped errors with the status codes the SDK maps to its exceptions."""

from __future__ import annotations

import httpx
import openai
import pytest

HELLO = [{"role": "user", "content": "hi"}]


def _assert_shape(body: dict[str, object]) -> dict[str, object]:
    assert set(body) == {"error"}
    error = body["error"]
    assert isinstance(error, dict)
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str)
    assert error["message"]
    return error


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="no-such-model", messages=HELLO)
    assert caught.value.status_code == 404
    assert caught.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="no-such-model", input="x")


def test_invalid_field_is_400_naming_the_param(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="demo-chat", messages=HELLO, temperature=5)
    assert caught.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as role:
        client.chat.completions.create(
            model="demo-chat",
            messages=[{"role": "wizard", "content": "hi"}],  # type: ignore[list-item,misc]
        )
    assert role.value.param == "messages[0].role"


def test_max_tokens_beyond_the_context_is_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="demo-chat", messages=HELLO, max_tokens=100_000)
    assert caught.value.code == "context_length_exceeded"
    assert caught.value.param == "max_tokens"


def test_prompt_longer_than_the_context_is_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(
            model="demo-chat", prompt=[100 + i % 500 for i in range(2100)], max_tokens=1
        )
    assert caught.value.code == "context_length_exceeded"


def test_n_and_messages_are_bounded(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="demo-chat", messages=HELLO, n=1000)
    assert caught.value.param == "n"
    with pytest.raises(openai.BadRequestError) as empty:
        client.chat.completions.create(model="demo-chat", messages=[])
    assert empty.value.param == "messages"


def test_body_too_large_is_413(client: openai.OpenAI) -> None:
    huge = "word " * 300_000  # 1.5 MB, over the 1 MiB limit the test gateway runs with
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(
            model="demo-chat", messages=[{"role": "user", "content": huge}]
        )
    assert caught.value.status_code == 413
    assert caught.value.code == "request_too_large"


def test_wrong_kind_of_model_is_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="minilm", messages=HELLO)
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="demo-chat", input="x")


def test_bad_embedding_inputs_are_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="minilm", input=[])
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="minilm", input="x", dimensions=12)


def test_malformed_bodies_get_the_openai_shape(http: httpx.Client) -> None:
    cases = [
        (b"{not json", 400),
        (b"", 400),
        (b'{"model": "demo-chat"}', 400),
        (b'{"model": "demo-chat", "messages": "hi"}', 400),
        (b'{"model": "demo-chat", "messages": [{"role": "user", "content": "x"}], "n": 0}', 400),
    ]
    for raw, status in cases:
        response = http.post(
            "/v1/chat/completions", content=raw, headers={"content-type": "application/json"}
        )
        assert response.status_code == status, raw
        error = _assert_shape(response.json())
        assert error["type"] == "invalid_request_error"
        assert response.headers["x-request-id"].startswith("req_")


def test_unknown_route_and_method_are_openai_shaped(http: httpx.Client) -> None:
    missing = http.get("/v1/nothing-here")
    assert missing.status_code == 404
    _assert_shape(missing.json())
    wrong = http.get("/v1/chat/completions")
    assert wrong.status_code == 405
    _assert_shape(wrong.json())
    assert wrong.headers["x-request-id"].startswith("req_")


def test_request_ids_are_unique_and_not_taken_from_the_client(http: httpx.Client) -> None:
    ids = {
        http.get("/healthz", headers={"x-request-id": "mine"}).headers["x-request-id"]
        for _ in range(5)
    }
    assert len(ids) == 5
    assert "mine" not in ids


def test_embedding_input_beyond_the_context_is_400_not_truncated(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model="minilm", input="word " * 400)
    assert caught.value.code == "context_length_exceeded"
