"""The FastAPI gateway: OpenAI-compatible /v1 routes, SSE, health and errors. No routing logic."""

from streamllm.gateway.app import create_app

__all__ = ["create_app"]
