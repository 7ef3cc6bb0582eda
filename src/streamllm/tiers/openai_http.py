"""The OpenAI-compatible HTTP backend: Ollama, llama.cpp, vLLM, OpenRouter, OpenAI, the simulator.

One pooled async httpx client per tier. Timeouts are separate and enforced here, not by httpx's
single read timeout: connect, time to first token, time between tokens, and the whole request.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import httpx2

from streamllm.config import TierSettings
from streamllm.errors import (
    BackendFailed,
    BackendRateLimited,
    BackendRejected,
    ContextTooLong,
)
from streamllm.protocol.sse import SSEBytesDecoder
from streamllm.tiers.base import Chunk, Dispatch, ProbeResult
from streamllm.tiers.h1stream import H1StreamClient, StreamFailed, StreamResponse
from streamllm.tiers.pump import Pump

_CONTEXT_MARKERS = ("maximum context length", "context_length_exceeded", "context window")


def _error_message(payload: Any, fallback: str) -> tuple[str, Any]:
    if isinstance(payload, dict):
        err = payload.get("error", payload)
        if isinstance(err, dict):
            return str(err.get("message") or fallback), err.get("code")
        if isinstance(err, str):
            return err, None
    return fallback, None


def classify_status(tier: str, status: int, text: str) -> Exception:
    """Map a backend's non-200 answer to the typed error the router acts on."""
    try:
        payload = json.loads(text)
    except ValueError:
        payload = None
    message, code = _error_message(payload, text[:300] or f"HTTP {status}")
    if status in (400, 413, 422):
        lowered = f"{message} {code}".lower()
        if any(m in lowered for m in _CONTEXT_MARKERS):
            return ContextTooLong(message, param="messages")
        return BackendRejected(message, code=str(code) if code is not None else None)
    if status == 429:
        return BackendRateLimited(f"{tier} backend is rate limited: {message}", tier=tier)
    return BackendFailed(f"{tier} backend answered {status}: {message}", tier=tier)


def has_output(chunk: dict[str, Any]) -> bool:
    """True once a chunk carries something the user sees (text, tool call, refusal, finish)."""
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta") or {}
        if delta.get("content") or delta.get("tool_calls") or delta.get("refusal"):
            return True
        if choice.get("finish_reason"):
            return True
    return False


_JSON = {"content-type": "application/json"}


def _direct_http(url: str) -> bool:
    """Plain http:// that the environment does not send through a proxy."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http":
        return False
    if "http" not in urllib.request.getproxies():
        return True
    return bool(urllib.request.proxy_bypass(parts.hostname or ""))


def _json_bytes(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def _finishes(chunk: dict[str, Any]) -> bool:
    return any(c.get("finish_reason") for c in chunk.get("choices") or ())


class OpenAIHTTPBackend:
    def __init__(self, tier: str, settings: TierSettings, base_url: str | None = None):
        self.tier = tier
        self.settings = settings
        self.base_url = (base_url or settings.base_url or "").rstrip("/")
        self.name = "simulator" if settings.simulated else self.base_url
        headers = {"accept": "application/json"}
        key = os.environ.get(settings.api_key_env) if settings.api_key_env else None
        if key:
            headers["authorization"] = f"Bearer {key}"
        t = settings.timeouts
        self._timeouts = t
        limits = httpx2.Limits(
            max_connections=settings.max_connections,
            max_keepalive_connections=settings.max_connections,
        )
        # Streamed completions over plain HTTP take the lean path (tiers/h1stream.py).
        self._h1 = (
            H1StreamClient(self.base_url, headers, max_idle=settings.max_connections)
            if settings.stream_client == "auto" and _direct_http(self.base_url) else None
        )
        self.client = httpx2.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            # read=None: between-token and first-token limits are enforced per chunk below.
            timeout=httpx2.Timeout(connect=t.connect, read=None, write=t.connect, pool=t.connect),
            limits=limits,
        )

    async def aclose(self) -> None:
        if self._h1 is not None:
            self._h1.close()
        await self.client.aclose()

    def _failed(self, what: str, exc: BaseException | None = None) -> BackendFailed:
        detail = f": {type(exc).__name__} {exc}".rstrip() if exc else ""
        return BackendFailed(f"{self.tier} backend {what}{detail}", tier=self.tier)

    async def complete(
        self, body: dict[str, Any], dispatch: Dispatch | None = None
    ) -> dict[str, Any]:
        try:
            async with asyncio.timeout(self._timeouts.total):
                resp = await self.client.post(
                    "/chat/completions", content=_json_bytes(body), headers=_JSON
                )
        except TimeoutError:
            raise self._failed(f"gave no answer within {self._timeouts.total:g}s") from None
        except httpx2.HTTPError as e:
            raise self._failed("could not be reached", e) from None
        if resp.status_code != 200:
            raise classify_status(self.tier, resp.status_code, resp.text)
        try:
            data = resp.json()
        except ValueError:
            raise self._failed("answered with invalid JSON") from None
        if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
            raise self._failed("answered without choices")
        return data

    async def _post_stream(self, body: dict[str, Any]) -> _BodySource:
        payload = _json_bytes(body)
        if self._h1 is not None:
            try:
                return _H1Source(await self._h1.post("/chat/completions", payload,
                                                     self._timeouts.connect))
            except StreamFailed as e:
                raise self._failed("could not be reached", e) from None
        try:
            request = self.client.build_request(
                "POST", "/chat/completions", content=payload, headers=_JSON
            )
            return _HttpxSource(await self.client.send(request, stream=True))
        except httpx2.HTTPError as e:
            raise self._failed("could not be reached", e) from None

    async def stream(
        self, body: dict[str, Any], dispatch: Dispatch | None = None
    ) -> AsyncIterator[list[Chunk]]:
        t = self._timeouts
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + t.total
        first_deadline = min(started + t.first_token, deadline)
        try:
            async with asyncio.timeout_at(first_deadline):
                source = await self._post_stream(body)
        except TimeoutError:
            raise self._failed(f"sent no response within {t.first_token:g}s") from None
        try:
            if source.status != 200:
                raise classify_status(self.tier, source.status, await source.text())
            decoder = SSEBytesDecoder()
            seen_output = finish_seen = done = eof = False
            while not (done or eof):
                until = deadline if seen_output else first_deadline
                if seen_output:
                    until = min(until, loop.time() + t.between_tokens)
                try:
                    async with asyncio.timeout_at(until):
                        data = await source.take()
                    events = decoder.feed(data) if data else decoder.flush()
                    eof = not data
                except TimeoutError:
                    phase = "between tokens" if seen_output else "before the first token"
                    raise self._failed(f"stalled {phase}") from None
                except (httpx2.HTTPError, StreamFailed) as e:
                    raise self._failed("broke the stream", e) from None
                batch = []
                for data in events:
                    if data == "[DONE]":
                        done = True
                        break
                    chunk = self._parse_chunk(data)
                    if not finish_seen and _finishes(chunk):
                        finish_seen = True
                    batch.append(Chunk(chunk, data))
                    if not seen_output and has_output(chunk):
                        seen_output = True
                        # The first token goes out before the rest of its read is parsed.
                        yield batch
                        batch = []
                if batch:
                    yield batch
            # Some servers end without [DONE]; that is complete only after a finish reason.
            if not (done or finish_seen):
                raise self._failed("ended the stream before finishing")
            if not eof:
                await source.drain(loop.time() + t.between_tokens)
        finally:
            await source.aclose()

    def _parse_chunk(self, data: str) -> dict[str, Any]:
        try:
            chunk = json.loads(data)
        except ValueError:
            raise self._failed("sent a malformed chunk") from None
        if not isinstance(chunk, dict):
            raise self._failed("sent a malformed chunk")
        if "error" in chunk and not chunk.get("choices"):
            message, _ = _error_message(chunk, "error event")
            raise self._failed(f"reported an error mid-stream: {message}")
        return chunk

    async def probe(self) -> ProbeResult:
        start = time.perf_counter()
        try:
            resp = await self.client.get("/models", timeout=self._timeouts.connect)
        except httpx2.HTTPError as e:
            return ProbeResult(False, f"{type(e).__name__}: {e}".strip(": "))
        ms = (time.perf_counter() - start) * 1000
        if resp.status_code != 200:
            return ProbeResult(False, f"HTTP {resp.status_code}", latency_ms=ms)
        try:
            models = [m["id"] for m in resp.json().get("data", []) if isinstance(m, dict)]
        except (ValueError, KeyError, AttributeError):
            models = []
        return ProbeResult(True, "ok", models, latency_ms=ms)


class _BodySource:
    """A streamed response body, read as "everything that has arrived since the last read"."""

    status: int

    async def take(self) -> bytes: ...

    async def text(self) -> str: ...

    async def aclose(self) -> None: ...

    async def drain(self, until: float) -> None:
        """Read what is left after `[DONE]` (the chunked terminator) so that the connection
        can be reused; closing a half-read response closes its connection."""
        try:
            async with asyncio.timeout_at(until):
                while await self.take():
                    pass
        except (TimeoutError, httpx2.HTTPError, StreamFailed):
            pass  # the connection is simply not reused


class _H1Source(_BodySource):
    def __init__(self, resp: StreamResponse):
        self._resp = resp
        self.status = resp.status

    async def take(self) -> bytes:
        return await self._resp.take()

    async def text(self) -> str:
        return (await self._resp.read()).decode("utf-8", "replace")

    async def aclose(self) -> None:
        self._resp.close()


class _HttpxSource(_BodySource):
    def __init__(self, resp: httpx2.Response):
        self._resp = resp
        self.status = resp.status_code
        self._pump: Pump | None = None

    async def take(self) -> bytes:
        if self._pump is None:
            self._pump = Pump(self._resp.aiter_raw())
        return await self._pump.take()

    async def text(self) -> str:
        await self._resp.aread()
        return self._resp.text

    async def aclose(self) -> None:
        try:
            if self._pump is not None:
                await self._pump.aclose()
        finally:
            await self._resp.aclose()
