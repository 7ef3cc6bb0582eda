"""Server-sent events as OpenAI uses them, without I/O: encode chunks, decode `data:` lines."""

from __future__ import annotations

import json
from typing import Any

DONE = b"data: [DONE]\n\n"


def encode(obj: Any) -> bytes:
    """One event: `data: {json}` and a blank line, compact JSON as OpenAI sends it."""
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


class SSEDecoder:
    """Feed lines (without newline); get back each complete event's data, or None.

    Comment lines (`:` keep-alives) and other fields are skipped; multi-line data is joined
    with newlines as the SSE specification says.
    """

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> str | None:
        if line == "":
            if not self._data:
                return None
            data, self._data = "\n".join(self._data), []
            return data
        if line.startswith(":"):
            return None
        field, _, value = line.partition(":")
        if field == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None

    def flush(self) -> str | None:
        """The last event when a stream ended without its blank line."""
        return self.feed("")
