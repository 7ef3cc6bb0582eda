"""How many tokens a conversation takes, per model, before it is sent (pure).

Without a tokenizer, a model's count is estimated as characters times a rate plus a few tokens
per message. The rate starts cautious (four characters per token) and is calibrated online from
the `prompt_tokens` the backend reports for what was actually sent, so it converges on each
model's own tokenizer. With a local `tokenizer.json` (and the `tokenizers` package) the count
is exact but for the chat template's few tokens per message. Nothing is ever downloaded.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from streamllm.errors import ConfigError

CHARS_PER_TOKEN = 4.0
PER_MESSAGE_TOKENS = 4
PER_IMAGE_TOKENS = 85  # a low-detail image; detailed ones cost more, and the backend will say
PRIMING_TOKENS = 2  # the assistant turn's opening the template adds
SETTLED_AFTER = 5  # observations after which an estimate is trusted more
LEARNING_RATE = 0.2  # weight of a new observation once settled


def estimate_text(text: str) -> int:
    return int(len(text) / CHARS_PER_TOKEN + 0.999)


def estimate_messages(texts: Iterable[str], images: int = 0) -> int:
    """The uncalibrated estimate, for decisions that come before a model is chosen."""
    total = PRIMING_TOKENS
    for text in texts:
        total += PER_MESSAGE_TOKENS + estimate_text(text)
    return total + images * PER_IMAGE_TOKENS


def message_text(message: Mapping[str, Any]) -> tuple[str, int]:
    """A message's text as a model reads it (content parts joined, tool calls included) and how
    many non-text parts it carries."""
    content = message.get("content")
    images = 0
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, Mapping) and part.get("type") == "text":
                parts.append(str(part.get("text", "")))
            else:
                images += 1
        text = "\n".join(parts)
    else:
        text = "" if content is None else str(content)
    for call in message.get("tool_calls") or ():
        fn = call.get("function", {}) if isinstance(call, Mapping) else {}
        text += f"\n{fn.get('name', '')}({fn.get('arguments', '')})"
    return text, images


@dataclass
class Calibration:
    tokens_per_char: float = 1.0 / CHARS_PER_TOKEN
    tokens_per_message: float = float(PER_MESSAGE_TOKENS)
    samples: int = 0


class TokenCounter:
    """One model's token counts: exact with a tokenizer, else calibrated estimates."""

    def __init__(self, calibration: Calibration | None = None, tokenizer: Any = None):
        self.calibration = calibration or Calibration()
        self.tokenizer = tokenizer  # anything with encode(text) -> object with .ids

    @property
    def exact(self) -> bool:
        return self.tokenizer is not None

    @property
    def margin(self) -> float:
        """The share of a window kept free for the estimate's error."""
        if self.exact:
            return 0.02
        return 0.05 if self.calibration.samples >= SETTLED_AFTER else 0.15

    def count_text(self, text: str) -> int:
        if not text:
            return 0
        if self.tokenizer is not None:
            return len(self.tokenizer.encode(text, add_special_tokens=False).ids)
        return math.ceil(len(text) * self.calibration.tokens_per_char)

    def count(self, messages: Sequence[Mapping[str, Any]]) -> int:
        total = float(PRIMING_TOKENS)
        per_message = (PER_MESSAGE_TOKENS if self.exact
                       else self.calibration.tokens_per_message)
        for message in messages:
            text, images = message_text(message)
            total += per_message + self.count_text(text) + images * PER_IMAGE_TOKENS
        return math.ceil(total)

    def observe(self, messages: Sequence[Mapping[str, Any]], prompt_tokens: int) -> bool:
        """Learn from a backend's `prompt_tokens` for exactly these messages. Returns whether
        the calibration changed."""
        if self.exact or prompt_tokens <= 0:
            return False
        chars = images = 0
        for message in messages:
            text, found = message_text(message)
            chars += len(text)
            images += found
        if chars < 50:
            return False  # too little text to say anything about the rate
        cal = self.calibration
        overhead = PRIMING_TOKENS + cal.tokens_per_message * len(messages) + images * PER_IMAGE_TOKENS
        rate = max(prompt_tokens - overhead, 1.0) / chars
        rate = min(max(rate, 0.05), 2.0)  # a broken report must not wreck every later estimate
        weight = 1.0 / (cal.samples + 1) if cal.samples < SETTLED_AFTER else LEARNING_RATE
        cal.tokens_per_char += weight * (rate - cal.tokens_per_char)
        cal.samples += 1
        return True


def load_tokenizer(path: str, where: str) -> Any:
    """A HuggingFace tokenizer from a local `tokenizer.json`; never downloads."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise ConfigError(f"{where}: exact token counts need the tokenizers package "
                          "(pip install 'streamllm[tokenizers]')") from None
    try:
        return Tokenizer.from_file(os.path.expanduser(path))
    except Exception as e:  # the library raises its own exception types for bad files
        raise ConfigError(f"{where}: cannot load {path}: {e}") from None
