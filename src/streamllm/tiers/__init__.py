"""Tiers: one `Backend` interface and the OpenAI-compatible HTTP backend behind local/hpc/cloud."""

from streamllm.tiers.base import Backend, Chunk, ProbeResult
from streamllm.tiers.openai_http import OpenAIHTTPBackend

__all__ = ["Backend", "Chunk", "OpenAIHTTPBackend", "ProbeResult"]
