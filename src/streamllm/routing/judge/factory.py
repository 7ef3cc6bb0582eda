"""Build the configured judge (classifier, llm or cascade) behind its cache."""

from __future__ import annotations

from streamllm.config import JudgeSettings
from streamllm.routing.judge.base import Judge
from streamllm.routing.judge.cache import CachedJudge
from streamllm.routing.judge.cascade import CascadeJudge
from streamllm.routing.judge.classifier import ClassifierJudge, load_model
from streamllm.routing.judge.llm import Complete, LLMJudge


def build_judge(settings: JudgeSettings, complete: Complete | None = None,
                model: str | None = None) -> Judge:
    """`complete` and `model` reach the judging model; without them only the classifier can
    run, and asking for `llm` or `cascade` is a configuration error the caller reports."""
    classifier = ClassifierJudge(load_model(settings.model_path))
    judge: Judge = classifier
    if settings.kind in ("llm", "cascade"):
        if complete is None or model is None:
            raise ValueError(f"the {settings.kind} judge needs the {settings.llm.tier} tier's "
                             "model, and that tier has none")
        llm = LLMJudge(complete, model, classifier, settings.llm.timeout_s)
        judge = llm if settings.kind == "llm" else CascadeJudge(
            classifier, llm, settings.cascade_threshold)
    return CachedJudge(judge, settings.cache_size) if settings.cache_size else judge
