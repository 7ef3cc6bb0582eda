"""The one interface every tier's backend implements; the gateway knows nothing else."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol


class Chunk(NamedTuple):
    """One streamed chunk: parsed for decisions, and as sent, so a relay can forward it
    without encoding it again."""

    data: dict[str, Any]
    raw: str


WAITING = "stream.waiting"  # the key of a waiting chunk's data


def waiting_note(note: str) -> Chunk:
    """A chunk that only says the request is waiting (for a cluster that is still starting).
    The gateway starts the response on it, so the client gets the queue headers at once, and
    sends it as an SSE comment line, which OpenAI clients skip; the comments also keep the
    connection from idling out during a start that takes minutes."""
    return Chunk({WAITING: note}, "")


def is_waiting_note(chunk: Chunk) -> bool:
    return WAITING in chunk.data


@dataclass
class ProbeResult:
    ok: bool
    detail: str = ""
    models: list[str] = field(default_factory=list)
    latency_ms: float = 0.0


@dataclass
class Dispatch:
    """What a backend is told about one request beyond its body, and what it reports back.

    `idempotency_key` identifies a client's request across its retries (the HPC tier joins a
    job already running instead of starting a second one). `headers` are response headers the
    backend wants the client to see, filled in before its first chunk (`x-stream-transport`).
    """

    idempotency_key: str | None = None
    caller: str | None = None  # whose request (a key's name): a scheduler may be told
    headers: dict[str, str] = field(default_factory=dict)
    # Another tier would take the request if this one cannot start it now (a cold cluster).
    may_fall_back: bool = False


class Backend(Protocol):
    """A place that runs chat completions.

    Failures are raised as `streamllm.errors` types: `BackendFailed` (try another tier),
    `BackendRateLimited`, `BackendRejected` / `ContextTooLong` (the request itself is the problem).
    """

    tier: str
    name: str  # what logs and /health/ready call it: a URL or "simulator"

    async def complete(
        self, body: dict[str, Any], dispatch: Dispatch | None = None
    ) -> dict[str, Any]:
        """Non-streaming completion; `body` is already adapted for this backend."""
        ...

    def stream(
        self, body: dict[str, Any], dispatch: Dispatch | None = None
    ) -> AsyncIterator[list[Chunk]]:
        """Yield parsed chunks in batches: each batch is everything that arrived together, so
        a relay can forward it in one write. Closing the iterator (aclose) cancels the backend
        request."""
        ...

    async def probe(self) -> ProbeResult:
        ...

    async def aclose(self) -> None:
        ...
