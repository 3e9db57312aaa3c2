"""Chat completions through the official openai client against the real engine."""

from __future__ import annotations

import json

import httpx
import openai

MODEL = "demo-chat"
HELLO = [{"role": "user", "content": "Hello, the quick gateway"}]


def test_chat_answers_with_usage(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12)
    assert reply.object == "chat.completion"
    assert reply.id.startswith("chatcmpl-")
    assert reply.model == MODEL
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.message.content
    assert choice.finish_reason in ("stop", "length")
    usage = reply.usage
    assert usage is not None
    assert usage.prompt_tokens > 0
    assert 0 < usage.completion_tokens <= 12
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens is not None


def test_alias_resolves_to_the_model(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="demo", messages=HELLO, max_tokens=2)
    assert reply.model == MODEL


def test_max_tokens_is_honoured_with_ignore_eos(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL,
        messages=HELLO,
        max_completion_tokens=25,
        extra_body={"ignore_eos": True},
    )
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 25
    assert reply.choices[0].finish_reason == "length"


def test_stream_yields_deltas_then_usage_then_done(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=HELLO,
            max_tokens=20,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length"
    assert all(f is None for f in finishes[:-1])
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.completion_tokens == 20
    assert last.usage.prompt_tokens_details is not None
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_stream_text_equals_non_stream_text_when_greedy(client: openai.OpenAI) -> None:
    args = {"model": MODEL, "messages": HELLO, "max_tokens": 30, "temperature": 0}
    whole = client.chat.completions.create(**args)  # type: ignore[call-overload]
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(**args, stream=True)  # type: ignore[call-overload]
        if c.choices
    )
    assert streamed == whole.choices[0].message.content


def test_raw_sse_ends_with_done_and_no_usage_unless_asked(http: httpx.Client) -> None:
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 5, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-request-id"].startswith("req_")
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert all("usage" not in p for p in payloads)
    assert all(p["object"] == "chat.completion.chunk" for p in payloads)


def test_stop_sequence_cuts_the_answer_before_it(client: openai.OpenAI) -> None:
    base = {"model": MODEL, "messages": HELLO, "max_tokens": 40, "temperature": 0}
    full = client.chat.completions.create(**base, extra_body={"ignore_eos": True})  # type: ignore[call-overload]
    text = full.choices[0].message.content
    assert text
    assert len(text) > 10
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = client.chat.completions.create(**base, stop=[stop], extra_body={"ignore_eos": True})  # type: ignore[call-overload]
    answer = cut.choices[0].message.content
    assert answer is not None
    assert cut.choices[0].finish_reason == "stop"
    assert stop not in answer
    assert text.startswith(answer)
    assert len(answer) < len(text)


def test_n_gives_that_many_distinct_choices(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL,
        messages=HELLO,
        n=2,
        max_tokens=16,
        temperature=1.0,
        extra_body={"ignore_eos": True},
    )
    assert sorted(c.index for c in reply.choices) == [0, 1]
    texts = [c.message.content for c in reply.choices]
    assert texts[0] != texts[1]
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 32


def test_n_streams_every_choice(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=HELLO,
            n=2,
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    finished = {c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason}
    assert finished == {0, 1}
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 16


def test_seed_makes_sampling_repeatable(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        reply = client.chat.completions.create(
            model=MODEL,
            messages=HELLO,
            max_tokens=24,
            temperature=1.0,
            seed=seed,
            extra_body={"ignore_eos": True},
        )
        return reply.choices[0].message.content or ""

    first = sample(7)
    assert sample(7) == first
    assert any(sample(seed) != first for seed in (8, 9, 10))


def test_logprobs_cover_every_token(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL,
        messages=HELLO,
        max_tokens=6,
        logprobs=True,
        top_logprobs=3,
        extra_body={"ignore_eos": True},
    )
    logprobs = reply.choices[0].logprobs
    assert logprobs is not None
    assert logprobs.content is not None
    assert len(logprobs.content) == 6
    for entry in logprobs.content:
        assert entry.logprob <= 0.0
        assert len(entry.top_logprobs) == 3
        assert max(t.logprob for t in entry.top_logprobs) >= entry.logprob


def test_content_parts_are_joined(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": [{"type": "text", "text": "Hello"}]},
        ],
        max_tokens=3,
    )
    assert reply.usage is not None
    assert reply.usage.prompt_tokens > 5


def test_repeated_long_prompt_reports_cached_tokens(client: openai.OpenAI) -> None:
    long = " ".join(["the shared prefix of a long system prompt"] * 40)
    messages = [{"role": "system", "content": long}, {"role": "user", "content": "hi"}]
    client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1)
    again = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1)
    assert again.usage is not None
    assert again.usage.prompt_tokens_details is not None
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert cached is not None
    assert cached >= again.usage.prompt_tokens // 2
