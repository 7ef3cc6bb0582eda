"""The HPC backend: a job through the control plane, its tokens back through the relay.

Per request: a fresh channel and 256-bit key, a producer token for the worker (delivered with
the key through the control plane only), a consumer token for us. We read the relay and watch
the control-plane future at the same time. If the relay fails or lies mid-stream, the rest of
the answer is taken from the future's result (the backstop) at the exact offset already sent,
so the client gets every token once. If nothing arrives in time, the request fails over.

Not yet wired into `streamllm serve` (see docs/relay.md); tested on its own.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from streamllm.errors import BackendFailed, RelayError
from streamllm.hpc.control import IdempotentSubmitter
from streamllm.hpc.worker import run_completion
from streamllm.relay.client import RelayLink, dial
from streamllm.relay.crypto import Opener, Sealer, new_key
from streamllm.relay.frames import Direction, FrameType
from streamllm.relay.tokens import mint
from streamllm.tiers.base import Chunk


@dataclass
class HPCDeadlines:
    producer_connect: float = 60.0  # first frame (or the job's result) must come by then
    first_token: float = 300.0
    between_tokens: float = 60.0
    total: float = 1800.0


class HPCRelayBackend:
    def __init__(
        self,
        tier: str,
        submitter: IdempotentSubmitter,
        relay_url: str,
        relay_secret: bytes,
        cluster_backend_url: str,
        deadlines: HPCDeadlines | None = None,
        encrypt: bool = True,
        token_ttl_s: float = 120.0,
    ):
        self.tier = tier
        self.name = f"hpc via {submitter.plane.name} + relay"
        self.submitter = submitter
        self.relay_url = relay_url
        self._secret = relay_secret
        self.cluster_backend_url = cluster_backend_url
        self.deadlines = deadlines or HPCDeadlines()
        self.encrypt = encrypt
        self._ttl = token_ttl_s
        self.healed = 0  # streams completed from the backstop after the relay failed

    def _failed(self, what: str) -> BackendFailed:
        return BackendFailed(f"{self.tier} backend {what}", tier=self.tier)

    async def stream(self, body: dict[str, Any]) -> AsyncIterator[list[Chunk]]:
        loop = asyncio.get_running_loop()
        started = loop.time()
        d = self.deadlines
        channel = secrets.token_hex(16)
        key = new_key() if self.encrypt else None
        job = {
            "relay_url": self.relay_url,
            "channel": channel,
            "producer_token": mint(self._secret, channel, "producer", self._ttl),
            "key": key,
            "backend_url": self.cluster_backend_url,
            "body": body,
        }
        future, _ = self.submitter.submit(channel, run_completion, job)
        result = asyncio.wrap_future(future)
        link: RelayLink | None = None
        try:
            link = await dial(
                self.relay_url, channel, "consumer", mint(self._secret, channel, "consumer",
                                                          self._ttl)
            )
        except RelayError:
            link = None  # no relay: the answer comes from the job's result alone
        opener = Opener(key, channel, Direction.DOWN, require_sealed=key is not None)
        delivered: dict[int, str] = {}
        seen_output = False
        frames = link.frames().__aiter__() if link is not None else None
        pending: asyncio.Future[bytes] | None = None
        try:
            while frames is not None:
                if pending is None:
                    pending = asyncio.ensure_future(anext(frames))
                if not seen_output:
                    limit = started + min(d.first_token, d.total) - loop.time()
                    if opener.next_seq == 0:
                        limit = min(limit, started + d.producer_connect - loop.time())
                else:
                    limit = min(d.between_tokens, started + d.total - loop.time())
                done, _ = await asyncio.wait(
                    {pending, result}, timeout=max(limit, 0),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if pending in done:
                    frame_task, pending = pending, None
                    try:
                        frame = frame_task.result()
                        ftype, payload = opener.open(frame)
                    except (StopAsyncIteration, RelayError):
                        break  # relay lost or compromised: heal from the backstop below
                    if ftype is FrameType.DATA:
                        chunk = json.loads(payload)
                        for c in chunk.get("choices") or ():
                            text = (c.get("delta") or {}).get("content") or ""
                            delivered[c.get("index", 0)] = delivered.get(c.get("index", 0), "") + text
                        seen_output = True
                        yield [Chunk(chunk, payload.decode())]
                        continue
                    if ftype is FrameType.ERROR:
                        raise self._failed(f"job failed: {json.loads(payload).get('error')}")
                    if ftype is FrameType.FINAL:
                        return
                    continue
                if result in done:
                    break  # the job finished; whatever the relay did not bring, the result has
                phase = "between tokens" if seen_output else (
                    "before the worker connected" if opener.next_seq == 0 else
                    "before the first token"
                )
                raise self._failed(f"stalled {phase}")
            async for batch in self._heal(result, delivered, started):
                yield batch
        except BaseException:
            if link is not None and not future.done():
                await self._cancel(link, key, channel)
            raise
        finally:
            if pending is not None:
                pending.cancel()
            if link is not None:
                await link.close()

    async def _heal(
        self, result: asyncio.Future[Any], delivered: dict[int, str], started: float
    ) -> AsyncIterator[list[Chunk]]:
        remaining = self.deadlines.total - (asyncio.get_running_loop().time() - started)
        try:
            outcome = await asyncio.wait_for(asyncio.shield(result), max(remaining, 0))
        except TimeoutError:
            raise self._failed("gave no result in time") from None
        except Exception as e:
            raise self._failed(f"job failed in the control plane: {e}") from None
        if outcome.get("error"):
            raise self._failed(f"job failed: {outcome['error']}")
        self.healed += 1
        chunks = []
        for choice in outcome["choices"]:
            index = choice["index"]
            sent = delivered.get(index, "")
            full = choice["content"] or ""
            rest = full[len(sent):] if full.startswith(sent) else ""
            chunks.append({"index": index, "delta": {"content": rest} if rest else {},
                           "finish_reason": choice["finish_reason"]})
        base = {"id": "hpc-backstop", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": outcome.get("model") or ""}
        batch = [Chunk({**base, "choices": [c]}, json.dumps({**base, "choices": [c]}))
                 for c in chunks]
        if outcome.get("usage"):
            usage = {**base, "choices": [], "usage": outcome["usage"]}
            batch.append(Chunk(usage, json.dumps(usage)))
        yield batch

    async def _cancel(self, link: RelayLink, key: bytes | None, channel: str) -> None:
        try:
            await link.send(Sealer(key, channel, Direction.UP).seal(FrameType.CANCEL, b""))
        except RelayError:
            pass
