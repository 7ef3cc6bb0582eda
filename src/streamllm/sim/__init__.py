"""Simulated OpenAI-compatible backend: stands in for model weights in tests, demo and benchmarks."""

from streamllm.sim.app import LoggedRequest, Simulator

__all__ = ["LoggedRequest", "Simulator"]
