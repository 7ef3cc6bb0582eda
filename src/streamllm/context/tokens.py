"""Token estimates before a request is sent (pure).

A first, deliberately cautious estimate: about four characters per token for text, plus the
few tokens a chat template adds per message. It decides only whether a tier's window is clearly
too small; the backend's own count (its `prompt_tokens`, or its context-length error) stays the
authority, and an error from it still moves the request to the next tier.
"""

from __future__ import annotations

from collections.abc import Iterable

CHARS_PER_TOKEN = 4.0
PER_MESSAGE_TOKENS = 4
PER_IMAGE_TOKENS = 85  # a low-detail image; detailed ones cost more, and the backend will say


def estimate_text(text: str) -> int:
    return int(len(text) / CHARS_PER_TOKEN + 0.999)


def estimate_messages(texts: Iterable[str], images: int = 0) -> int:
    total = 2
    for text in texts:
        total += PER_MESSAGE_TOKENS + estimate_text(text)
    return total + images * PER_IMAGE_TOKENS
