"""Turn engine output into OpenAI response objects and SSE events."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from gateway.calls import Usage
from serving import ChoiceDelta, TokenLogprob

__all__ = ["ChoiceAccumulator", "Usage", "sse", "usage_body"]

Flavor = Literal["chat", "text"]
_encode = msgspec.json.Encoder().encode
DONE = b"data: [DONE]\n\n"


def sse(obj: Any) -> bytes:
    return b"data: " + _encode(obj) + b"\n\n"


def usage_body(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": 0},
        "gpu_ms": round(usage.gpu_ms, 3),
    }


def finish_reason(delta: ChoiceDelta) -> str | None:
    """OpenAI's reason: ``stop`` and ``length`` pass, an engine abort reads as ``stop``."""
    reason = delta.finish_reason
    if reason is None:
        return None
    return "length" if reason == "length" else "stop"


def chat_logprobs(entries: list[TokenLogprob] | None) -> dict[str, Any] | None:
    if entries is None:
        return None
    return {
        "content": [
            {
                "token": e.token,
                "logprob": e.logprob,
                "bytes": list(e.token.encode()),
                "top_logprobs": [
                    {"token": t.token, "logprob": t.logprob, "bytes": list(t.token.encode())}
                    for t in e.top
                ],
            }
            for e in entries
        ],
        "refusal": None,
    }


def text_logprobs(entries: list[TokenLogprob] | None, offset: int = 0) -> dict[str, Any] | None:
    if entries is None:
        return None
    offsets, position = [], offset
    for e in entries:
        offsets.append(position)
        position += len(e.token)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{t.token: t.logprob for t in e.top} for e in entries],
        "text_offset": offsets,
    }


class ChoiceAccumulator:
    """Collects the deltas of every choice of a non-streamed answer."""

    def __init__(self) -> None:
        self.text: dict[int, list[str]] = {}
        self.logprobs: dict[int, list[TokenLogprob] | None] = {}
        self.finish: dict[int, str | None] = {}

    def add(self, index: int, delta: ChoiceDelta) -> None:
        self.text.setdefault(index, []).append(delta.text)
        if delta.logprobs is not None:
            existing = self.logprobs.get(index) or []
            self.logprobs[index] = existing + delta.logprobs
        elif index not in self.logprobs:
            self.logprobs[index] = None
        if delta.finish_reason is not None:
            self.finish[index] = finish_reason(delta)

    def choices(self, flavor: Flavor) -> list[dict[str, Any]]:
        out = []
        for index in sorted(self.text):
            text = "".join(self.text[index])
            entries = self.logprobs.get(index)
            if flavor == "chat":
                out.append(
                    {
                        "index": index,
                        "message": {"role": "assistant", "content": text, "refusal": None},
                        "logprobs": chat_logprobs(entries),
                        "finish_reason": self.finish.get(index, "stop"),
                    }
                )
            else:
                out.append(
                    {
                        "index": index,
                        "text": text,
                        "logprobs": text_logprobs(entries),
                        "finish_reason": self.finish.get(index, "stop"),
                    }
                )
        return out
