"""A bounded LRU of judgements, in front of any judge: a repeated query is judged once."""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import replace

from streamllm.routing.judge.base import Judge, Judgement


def _key(text: str, context: Sequence[str]) -> bytes:
    h = hashlib.sha256()
    for part in (*context, text):
        h.update(len(part).to_bytes(8, "big"))
        h.update(part.encode("utf-8", "surrogatepass"))
    return h.digest()


class CachedJudge:
    def __init__(self, inner: Judge, size: int = 4096):
        self.inner = inner
        self.name = inner.name
        self.size = size
        self._entries: OrderedDict[bytes, Judgement] = OrderedDict()
        self.hits = 0
        self.misses = 0

    async def judge(self, text: str, context: Sequence[str] = ()) -> Judgement:
        start = time.perf_counter()
        key = _key(text, context)
        found = self._entries.get(key)
        if found is not None:
            self._entries.move_to_end(key)
            self.hits += 1
            return replace(found, latency_ms=(time.perf_counter() - start) * 1000, cached=True)
        self.misses += 1
        judgement = await self.inner.judge(text, context)
        if self.size > 0 and not judgement.judge.startswith(("llm->", "cascade:llm->")):
            # A fallback judgement is not cached: the model may answer next time.
            self._entries[key] = judgement
            if len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return judgement
