"""Legacy completions, embeddings and the model list through the openai client."""

from __future__ import annotations

import base64
import math
import struct

import httpx
import openai


def test_completion_of_a_string(client: openai.OpenAI) -> None:
    reply = client.completions.create(model="demo-chat", prompt="The quick gateway", max_tokens=8)
    assert reply.object == "text_completion"
    assert reply.id.startswith("cmpl-")
    assert reply.choices[0].text
    assert reply.usage is not None
    assert 0 < reply.usage.completion_tokens <= 8


def test_completion_default_max_tokens_is_16(client: openai.OpenAI) -> None:
    reply = client.completions.create(
        model="demo-chat", prompt="a tiny model", extra_body={"ignore_eos": True}
    )
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 16


def test_completion_of_several_prompts_and_token_arrays(client: openai.OpenAI) -> None:
    reply = client.completions.create(
        model="demo-chat", prompt=["one prompt", "another prompt"], max_tokens=4, n=2
    )
    assert sorted(c.index for c in reply.choices) == [0, 1, 2, 3]
    tokens = client.completions.create(model="demo-chat", prompt=[300, 301, 302], max_tokens=3)
    assert tokens.usage is not None
    assert tokens.usage.prompt_tokens == 3


def test_completion_stream_with_logprobs(client: openai.OpenAI) -> None:
    chunks = list(
        client.completions.create(
            model="demo-chat",
            prompt="stream me",
            max_tokens=5,
            logprobs=2,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    tokens = [t for c in chunks if c.choices for t in (c.choices[0].logprobs.tokens or [])]  # type: ignore[union-attr]
    assert len(tokens) == 5
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 5


def _cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def test_embeddings_agree_for_the_same_text_and_differ_otherwise(client: openai.OpenAI) -> None:
    texts = ["A cat sits on the mat.", "A cat sits on the mat.", "Quarterly revenue grew 4%."]
    reply = client.embeddings.create(model="minilm", input=texts)
    vectors = [d.embedding for d in sorted(reply.data, key=lambda d: d.index)]
    assert all(len(v) == 384 for v in vectors)
    assert _cosine(vectors[0], vectors[1]) > 0.9999
    assert _cosine(vectors[0], vectors[2]) < 0.5
    assert reply.usage.prompt_tokens > 0
    again = client.embeddings.create(model="minilm", input=texts[0]).data[0].embedding
    assert _cosine(again, vectors[0]) > 0.9999


def test_embeddings_related_texts_are_closer(client: openai.OpenAI) -> None:
    reply = client.embeddings.create(
        model="minilm", input=["a dog runs in the park", "a puppy plays outside", "tax law"]
    )
    dog, puppy, tax = (d.embedding for d in reply.data)
    assert _cosine(dog, puppy) > _cosine(dog, tax)


def test_embeddings_base64_matches_float(http: httpx.Client) -> None:
    body = {"model": "minilm", "input": "base64 please"}
    floats = http.post("/v1/embeddings", json=body).json()["data"][0]["embedding"]
    encoded = http.post("/v1/embeddings", json={**body, "encoding_format": "base64"}).json()
    raw = base64.b64decode(encoded["data"][0]["embedding"])
    decoded = struct.unpack(f"<{len(raw) // 4}f", raw)
    assert len(decoded) == len(floats) == 384
    assert max(abs(a - b) for a, b in zip(decoded, floats, strict=True)) < 1e-6


def test_embeddings_of_token_arrays(client: openai.OpenAI) -> None:
    reply = client.embeddings.create(model="minilm", input=[[101, 7592, 2088, 102], [101, 102]])
    assert len(reply.data) == 2
    assert reply.usage.prompt_tokens == 6


def test_sdk_embeddings_default_base64_path(client: openai.OpenAI) -> None:
    # The SDK asks for base64 by default and decodes it itself.
    vector = client.embeddings.create(model="minilm", input="hello").data[0].embedding
    assert len(vector) == 384
    assert abs(math.sqrt(sum(x * x for x in vector)) - 1.0) < 1e-3


def test_models_list_and_get(client: openai.OpenAI) -> None:
    ids = {m.id for m in client.models.list()}
    assert ids == {"demo-chat", "demo-chat:sample", "minilm"}
    assert client.models.retrieve("demo-chat").id == "demo-chat"
    assert client.models.retrieve("demo").id == "demo-chat"


def test_health_and_readiness(http: httpx.Client) -> None:
    assert http.get("/healthz").json() == {"status": "ok"}
    ready = http.get("/readyz")
    assert ready.status_code == 200
    body = ready.json()
    assert body["status"] == "ready"
    assert set(body["models"]) == {"demo-chat", "minilm"}
    assert all(m["ready"] for m in body["models"].values())


def test_text_input_equals_its_tokens_with_special_tokens(client: openai.OpenAI) -> None:
    # "hello world" in MiniLM's vocabulary, with the [CLS] and [SEP] it was trained with.
    text = client.embeddings.create(model="minilm", input="hello world")
    tokens = client.embeddings.create(model="minilm", input=[[101, 7592, 2088, 102]])
    assert text.usage.prompt_tokens == 4
    assert _cosine(text.data[0].embedding, tokens.data[0].embedding) > 0.9999
