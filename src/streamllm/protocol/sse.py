"""Server-sent events as OpenAI uses them, without I/O: encode chunks, decode raw bytes."""

from __future__ import annotations

import json
from typing import Any

DONE = b"data: [DONE]\n\n"


def encode(obj: Any) -> bytes:
    """One event: `data: {json}` and a blank line, compact JSON as OpenAI sends it."""
    try:
        text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
    except UnicodeEncodeError:  # a lone surrogate from a backend's "\ud800" escape
        text = json.dumps(obj, separators=(",", ":")).encode()
    return b"data: " + text + b"\n\n"


class SSEBytesDecoder:
    """Feed raw bytes as they arrive; get back the data of every event completed by them.

    Working on whole network reads (not line by line) lets a relay handle everything that
    arrived together in one step, which is most of the cost of a fast stream.
    """

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[str]:
        buffer = self._buffer + data
        held = b""
        if b"\r" in buffer:
            if buffer.endswith(b"\r"):  # maybe half of a CRLF: decide when the rest arrives
                buffer, held = buffer[:-1], b"\r"
            buffer = buffer.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        *blocks, rest = buffer.split(b"\n\n")
        self._buffer = rest + held
        return [d for block in blocks if (d := _event_data(block)) is not None]

    def flush(self) -> list[str]:
        """The last event when a stream ended without its blank line."""
        block, self._buffer = self._buffer, b""
        block = block.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        d = _event_data(block.rstrip(b"\n"))
        return [] if d is None else [d]


def _event_data(block: bytes) -> str | None:
    if block.startswith(b"data: ") and b"\n" not in block:
        return block[6:].decode(errors="replace")  # the common case: one `data:` line
    parts = []
    for line in block.split(b"\n"):
        if line.startswith(b"data:"):
            value = line[5:]
            parts.append(value[1:] if value.startswith(b" ") else value)
    return b"\n".join(parts).decode(errors="replace") if parts else None
