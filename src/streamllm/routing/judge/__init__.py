"""Complexity judges: how much work answering a request takes (LOW, MEDIUM or HIGH)."""

from streamllm.routing.judge.base import Judge, Judgement
from streamllm.routing.judge.classifier import ClassifierJudge
from streamllm.routing.judge.factory import build_judge

__all__ = ["ClassifierJudge", "Judge", "Judgement", "build_judge"]
