"""What the simulator says, computed without I/O: token counts and deterministic answers.

The answer is a pure function of (model, messages, choice index), so a test can compute what a
backend must have produced and prove which request reached which backend.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from typing import Any

_TOKEN = re.compile(r"\w+|[^\w\s]")
# Words, not random bytes, so the demo reads like prose and stop sequences are easy to aim at.
VOCABULARY = ["the", "model", "routes", "each", "query", "to", "a", "tier", "that", "can", "answer", "it", "well", "while", "data", "stays", "inside", "institution", "cluster", "relay", "stream", "token", "cost", "local", "cloud", "hpc", "job", "node", "queue", "window", "summary", "context", "policy", "judge", "fast", "slow", "small", "large", "research", "compute", "answer", "result", "value", "simple", "complex", "first", "next", "last", "step", "proof", "method", "data", "energy", "graph", "signal", "sample", "error", "rate", "time"]
PER_MESSAGE_OVERHEAD = 4  # role and separators, roughly what chat templates add
PER_IMAGE_TOKENS = 85


def count_tokens(text: str) -> int:
    return len(_TOKEN.findall(text))


def _message_text(message: dict[str, Any]) -> tuple[str, int]:
    content = message.get("content")
    extra = 0
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text":
                texts.append(str(part.get("text", "")))
            else:
                extra += PER_IMAGE_TOKENS
        text = "\n".join(texts)
    else:
        text = "" if content is None else str(content)
    for call in message.get("tool_calls") or []:
        fn = call.get("function", {}) if isinstance(call, dict) else {}
        text += f" {fn.get('name', '')} {fn.get('arguments', '')}"
    return text, extra


def prompt_tokens(messages: list[dict[str, Any]], tools: list[Any] | None = None) -> int:
    total = 2
    for m in messages:
        text, extra = _message_text(m)
        total += PER_MESSAGE_OVERHEAD + count_tokens(text) + extra
    if tools:
        total += count_tokens(json.dumps(tools))
    return total


def _digest(model: str, messages: list[dict[str, Any]], index: int, seed: int | None) -> bytes:
    canon = json.dumps(
        [model, [[m.get("role"), _message_text(m)[0]] for m in messages], index, seed],
        separators=(",", ":"),
    )
    return hashlib.sha256(canon.encode()).digest()


def _words(digest: bytes) -> Iterator[str]:
    block = digest
    while True:
        for byte in block:
            yield VOCABULARY[byte % len(VOCABULARY)]
        block = hashlib.sha256(block).digest()


def answer_tokens(
    model: str,
    messages: list[dict[str, Any]],
    count: int,
    index: int = 0,
    seed: int | None = None,
) -> list[str]:
    """The first `count` tokens of the answer; joined with "" they form the text."""
    words = _words(_digest(model, messages, index, seed))
    return [next(words) if i == 0 else " " + next(words) for i in range(count)]


def answer_text(
    model: str, messages: list[dict[str, Any]], count: int, index: int = 0, seed: int | None = None
) -> str:
    return "".join(answer_tokens(model, messages, count, index, seed))


def split_reply(text: str) -> list[str]:
    """A fixed reply as stream tokens: each word with the space before it."""
    return re.findall(r"\s*\S+|\s+$", text)


def apply_stop(tokens: list[str], stop: str | list[str] | None) -> tuple[list[str], bool]:
    """Cut the answer before the first stop sequence (which may span tokens); True if found."""
    stops = [stop] if isinstance(stop, str) else [s for s in (stop or []) if s]
    if not stops:
        return tokens, False
    text = "".join(tokens)
    hits = [text.find(s) for s in stops if s in text]
    if not hits:
        return tokens, False
    cut, kept, used = min(hits), [], 0
    for tok in tokens:
        if used + len(tok) <= cut:
            kept.append(tok)
            used += len(tok)
        else:
            if cut > used:
                kept.append(tok[: cut - used])
            break
    return kept, True


def context_error_message(window: int, prompt: int, completion: int) -> str:
    """vLLM's wording for a request over the model's window."""
    return (
        f"This model's maximum context length is {window} tokens. However, you requested "
        f"{prompt + completion} tokens ({prompt} in the messages, {completion} in the "
        "completion). Please reduce the length of the messages or completion."
    )
