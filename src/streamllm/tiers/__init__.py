"""Tiers: one `Backend` interface; the OpenAI-compatible HTTP backend and the HPC backend."""

from streamllm.tiers.base import Backend, Chunk, Dispatch, ProbeResult
from streamllm.tiers.openai_http import OpenAIHTTPBackend

__all__ = ["Backend", "Chunk", "Dispatch", "OpenAIHTTPBackend", "ProbeResult"]
