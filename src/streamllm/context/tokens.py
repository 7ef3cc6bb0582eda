"""How many tokens a conversation takes, per model, before it is sent (pure).

Without a tokenizer, a model's count is estimated as characters times a rate plus a few tokens
per message. The rate starts cautious (four characters per token) and is calibrated online from
the `prompt_tokens` the backend reports for what was actually sent, so it converges on each
model's own tokenizer. With a local `tokenizer.json` (and the `tokenizers` package) the count
is exact but for the chat template's few tokens per message. With a local GGUF model file (and
llama-cpp-python) the vocabulary alone is loaded, and the tokens its own chat template adds
around the messages are measured from that template once, at load: the count is then what a
llama.cpp server reports for the same messages (see `ChatOverhead`). Nothing is ever downloaded.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
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


@dataclass(frozen=True)
class ChatOverhead:
    """The tokens a model's chat template adds around the messages' text, for exact counts.

    The defaults are the usual few; a tokenizer that knows its model's template (a GGUF file
    carries it) says exactly, in its `chat_overhead` attribute. SmolLM2's ChatML template, for
    one, adds 5 tokens around a user or system message, 6 around an assistant's ("assistant" is
    two tokens), 4 for the answer's opening, and a 21-token default system prompt when the
    first message is not a system message. With the defaults, 32 messages (1,819 tokens by the
    server) were counted 49 short, more than the exact count's 2 % margin: the prompt and the
    answer's reserve could overflow the window.

    Measured once rather than learned from `prompt_tokens`: the first request must already
    fit, and a report also counts what the messages do not hold (tools, detailed images), which
    would inflate a learned overhead for good.
    """

    per_message: int = PER_MESSAGE_TOKENS  # for a role not in by_role
    priming: int = PRIMING_TOKENS  # the assistant turn's opening the template adds
    by_role: Mapping[str, int] = field(default_factory=dict)
    without_system: int = 0  # a default system prompt added when messages[0] is no system one

    def message(self, role: Any) -> int:
        return self.by_role.get(role, self.per_message) if isinstance(role, str) else \
            self.per_message


class TokenCounter:
    """One model's token counts: exact with a tokenizer, else calibrated estimates."""

    def __init__(self, calibration: Calibration | None = None, tokenizer: Any = None):
        self.calibration = calibration or Calibration()
        self.tokenizer = tokenizer  # anything with encode(text) -> object with .ids
        # Exact counts only: the template's tokens around the text, if the tokenizer knows them.
        self.overhead = getattr(tokenizer, "chat_overhead", None) or ChatOverhead()

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
        if self.exact:
            return self._count_exact(messages)
        total = float(PRIMING_TOKENS)
        for message in messages:
            text, images = message_text(message)
            total += (self.calibration.tokens_per_message + self.count_text(text)
                      + images * PER_IMAGE_TOKENS)
        return math.ceil(total)

    def _count_exact(self, messages: Sequence[Mapping[str, Any]]) -> int:
        o = self.overhead
        total = o.priming
        if messages and messages[0].get("role") != "system":
            total += o.without_system
        for message in messages:
            text, images = message_text(message)
            total += (o.message(message.get("role")) + self.count_text(text)
                      + images * PER_IMAGE_TOKENS)
        return total

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
    """A HuggingFace tokenizer from a local `tokenizer.json`, or a GGUF model's vocabulary from
    a local `.gguf` file; never downloads."""
    if path.lower().endswith(".gguf"):
        return GGUFTokenizer.load(path, where)
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise ConfigError(f"{where}: exact token counts need the tokenizers package "
                          "(pip install 'streamllm[tokenizers]')") from None
    try:
        return Tokenizer.from_file(os.path.expanduser(path))
    except Exception as e:  # noqa: BLE001 - the library raises its own types for bad files
        raise ConfigError(f"{where}: cannot load {path}: {e}") from None


@dataclass(frozen=True)
class Encoding:
    ids: list[int]


class GGUFTokenizer:
    """A GGUF model's tokenizer through llama-cpp-python, its vocabulary only (no weights), with
    the interface TokenCounter uses: `encode(text, add_special_tokens=False).ids`."""

    PROBE = "Hello."  # a message text for measuring the chat template
    CACHE_ENTRIES = 4096  # texts whose tokens are kept, at most CACHE_CHARS characters each...
    CACHE_CHARS = 8192
    CACHE_TOTAL_CHARS = 2_000_000  # ...and this many in all (prompts' text, held in memory)

    def __init__(self, llama: Any):
        self.llama = llama
        self._cache: dict[str, Encoding] = {}  # in use order, oldest first
        self._cached_chars = 0
        self.chat_overhead: ChatOverhead | None = self._measure_template()

    @classmethod
    def load(cls, path: str, where: str) -> GGUFTokenizer:
        try:
            import llama_cpp
        except ImportError:
            raise ConfigError(f"{where}: exact token counts from a GGUF file need "
                              "llama-cpp-python (pip install 'streamllm[real]')") from None
        full = os.path.expanduser(path)
        if not os.path.isfile(full):
            raise ConfigError(f"{where}: cannot load {path}: no such file")
        try:
            return cls(llama_cpp.Llama(model_path=full, vocab_only=True, verbose=False))
        except Exception as e:  # noqa: BLE001 - ValueError mostly, others for odd files
            raise ConfigError(f"{where}: cannot load {path}: {e}") from None

    def encode(self, text: str, add_special_tokens: bool = False) -> Encoding:
        # Fitting counts the same messages again for every boundary it weighs, and a client
        # sends its whole history every turn: 0.6 s for one plan of 120 messages uncached.
        if len(text) <= self.CACHE_CHARS and not add_special_tokens:
            found = self._cache.pop(text, None)
            if found is None:
                found = self._encode(text, False)
                self._cached_chars += len(text)
                while self._cache and (len(self._cache) >= self.CACHE_ENTRIES or
                                       self._cached_chars > self.CACHE_TOTAL_CHARS):
                    oldest = next(iter(self._cache))  # the least recently used
                    del self._cache[oldest]
                    self._cached_chars -= len(oldest)
            self._cache[text] = found
            return found
        return self._encode(text, add_special_tokens)

    def _encode(self, text: str, add_bos: bool) -> Encoding:
        # Text as text: "<|im_end|>" written in a message is not the special token here. The
        # server parses the rendered prompt for special tokens, so it counts such text as
        # fewer tokens, never more.
        return Encoding(self.llama.tokenize(text.encode("utf-8", "replace"), add_bos=add_bos,
                                            special=False))

    def _measure_template(self) -> ChatOverhead | None:
        """The template's tokens around the text, from the GGUF's `tokenizer.chat_template`
        rendered the way llama-cpp-python's server renders it (Jinja2ChatFormatter, then the
        prompt tokenized with special tokens and no extra BOS). None: no usable template, and
        the counter keeps the usual defaults."""
        template = (self.llama.metadata or {}).get("tokenizer.chat_template")
        if not template:
            return None
        try:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            def text_of(token: int) -> str:
                if token < 0:
                    return ""
                return self.llama.detokenize([token], special=True).decode("utf-8", "replace")

            render = Jinja2ChatFormatter(template, eos_token=text_of(self.llama.token_eos()),
                                         bos_token=text_of(self.llama.token_bos()))

            def tokens(*roles: str) -> int:
                prompt = render(messages=[{"role": r, "content": self.PROBE} for r in roles])
                return len(self.llama.tokenize(prompt.prompt.encode("utf-8"), add_bos=False,
                                               special=True))

            k = len(self.encode(self.PROBE).ids)
            by_role = {"user": tokens("system", "user") - tokens("system") - k,
                       "assistant": (tokens("system", "user", "assistant")
                                     - tokens("system", "user") - k)}
            try:  # a later system message (the summary is one); some templates refuse it
                by_role["system"] = (tokens("system", "user", "assistant", "system")
                                     - tokens("system", "user", "assistant") - k)
            except Exception:  # noqa: BLE001 - whatever the template raises
                by_role["system"] = max(by_role.values())
            priming = max(tokens("system") - k - by_role["system"], 0)
            without_system = max(tokens("user") - k - by_role["user"] - priming, 0)
            # Whatever the template does by position that the measures above miss goes into
            # the priming, so that these conversations at least are never undercounted.
            counter = TokenCounter(tokenizer=self)
            counter.overhead = ChatOverhead(max(by_role.values()), priming, by_role,
                                            without_system)
            short = max(tokens(*roles) - counter.count([{"role": r, "content": self.PROBE}
                                                        for r in roles])
                        for roles in (("user", "assistant", "user"),
                                      ("system", "user", "assistant", "user")))
            return ChatOverhead(max(by_role.values()), priming + max(short, 0), by_role,
                                without_system)
        except Exception as e:  # noqa: BLE001 - a template not renderable here: the defaults
            logging.getLogger("streamllm.context").warning(
                "the GGUF's chat template could not be measured (%s: %s); counts use the "
                "usual per-message overhead and may be a few tokens short", type(e).__name__, e)
            return None

