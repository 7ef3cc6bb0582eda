"""`streamllm judge`: train the complexity classifier, evaluate a judge, classify one text."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from streamllm.config import JudgeSettings, TierSettings, load_settings
from streamllm.errors import ConfigError

judge_app = typer.Typer(
    add_completion=False, no_args_is_help=True,
    help="The complexity judge: train the classifier, evaluate a judge, classify a text.",
)

JudgeKind = Annotated[str, typer.Option("--judge", help="classifier, llm or cascade.")]
ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="YAML configuration file (else $STREAMLLM_CONFIG)."),
]
BaseUrlOption = Annotated[
    str | None,
    typer.Option(help="llm/cascade: an OpenAI-compatible server to ask (else the configured "
                      "tier of routing.judge.llm)."),
]
ModelOption = Annotated[str | None, typer.Option(help="llm/cascade: the model to ask.")]
DEFAULT_TRAIN = Path("datasets/complexity/train.jsonl")


def _fail(message: str) -> None:
    typer.echo(f"streamllm judge: {message}", err=True)
    raise typer.Exit(2)


@judge_app.command()
def train(
    data: Annotated[Path, typer.Option(help="Labelled JSON Lines (text, ground_truth, "
                                            "domain).")] = DEFAULT_TRAIN,
    out: Annotated[Path | None, typer.Option(help="Where to write the model (default: the "
                                                      "one shipped in the package).")] = None,
    cross_validate: Annotated[bool, typer.Option(
        "--cv/--no-cv", help="Also report leave-one-domain-out cross-validation.")] = True,
) -> None:
    """Train the classifier on DATA and write it; prints a JSON summary."""
    from streamllm.routing.judge.classifier import default_model_path
    from streamllm.routing.judge.train import Params, load_examples, train_classifier
    from streamllm.routing.judge.train import cross_validate as run_cv

    try:
        examples = load_examples(data)
    except (OSError, ValueError) as e:
        _fail(f"cannot read the training data: {e}")
    if not examples:
        _fail(f"{data} holds no examples")
    started = time.perf_counter()
    model = train_classifier(examples, Params())
    target = out or default_model_path()
    target.write_text(model.to_json() + "\n", encoding="utf-8")
    summary: dict[str, Any] = {
        "model": str(target), "examples": len(examples), "features": len(model.weights),
        "temperature": round(model.temperature, 4),
        "seconds": round(time.perf_counter() - started, 1),
    }
    if cross_validate and len({ex.domain for ex in examples}) > 1:
        summary["leave_one_domain_out"] = run_cv(examples, Params())
    typer.echo(json.dumps(summary, indent=2))


def _judge_for(kind: str, config: Path | None, base_url: str | None,
               model: str | None) -> tuple[Any, Any]:
    """The judge to evaluate (no cache: every query is judged), and what to close after."""
    from streamllm.routing.judge import build_judge
    from streamllm.tiers import OpenAIHTTPBackend
    from streamllm.tiers.adapt import backend_body

    if kind not in ("classifier", "llm", "cascade"):
        _fail(f"--judge must be classifier, llm or cascade, not {kind!r}")
    try:
        settings = load_settings(config)
    except ConfigError as e:
        _fail(str(e))
    judge_settings: JudgeSettings = settings.routing.judge.model_copy(
        update={"kind": kind, "cache_size": 0})
    if kind == "classifier":
        return build_judge(judge_settings), None
    tier_name = judge_settings.llm.tier
    tier = settings.tier(tier_name)
    if base_url:
        tier = TierSettings(kind="openai", base_url=base_url, models=[model] if model else [])
    if tier is None or not tier.base_url:
        _fail(f"the {kind} judge needs a model to ask: configure tiers.{tier_name} with a "
              "base_url, or pass --base-url and --model")
    asked = model or judge_settings.llm.model or tier.default_model
    if not asked:
        _fail("no model to ask: pass --model or set routing.judge.llm.model")
    backend = OpenAIHTTPBackend(tier_name, tier)

    async def complete(body: dict[str, Any]) -> dict[str, Any]:
        return await backend.complete(backend_body(body, asked, tier, stream=False))

    return build_judge(judge_settings, complete, asked), backend


@judge_app.command("eval")
def evaluate_cmd(
    dataset: Annotated[Path, typer.Option(help="JSON Lines with text and ground_truth.")],
    judge: JudgeKind = "classifier",
    config: ConfigOption = None,
    base_url: BaseUrlOption = None,
    model: ModelOption = None,
    high_threshold: Annotated[float | None, typer.Option(
        help="P(HIGH) needed for HIGH (default routing.high_threshold).")] = None,
) -> None:
    """Score a judge on a labelled dataset; prints one JSON object."""
    from streamllm.routing.judge.metrics import evaluate
    from streamllm.routing.judge.train import load_examples
    from streamllm.routing.policy import level_for

    try:
        examples = load_examples(dataset)
    except (OSError, ValueError) as e:
        _fail(f"cannot read the dataset: {e}")
    if not examples:
        _fail(f"{dataset} holds no examples")
    threshold = high_threshold
    if threshold is None:
        try:
            threshold = load_settings(config).routing.high_threshold
        except ConfigError as e:
            _fail(str(e))
    the_judge, backend = _judge_for(judge, config, base_url, model)

    async def run() -> tuple[list[str], list[float]]:
        predicted, latencies = [], []
        try:
            for ex in examples:
                start = time.perf_counter()
                judgement = await the_judge.judge(ex.text)
                latencies.append((time.perf_counter() - start) * 1000)
                predicted.append(level_for(judgement, threshold))
        finally:
            if backend is not None:
                await backend.aclose()
        return predicted, latencies

    predicted, latencies = asyncio.run(run())
    result = evaluate([ex.label for ex in examples], predicted, latencies)
    result["judge"] = judge
    result["high_threshold"] = threshold
    if judge != "classifier":
        result["llm_fallbacks"] = getattr(getattr(the_judge, "llm", the_judge), "failures", 0)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


@judge_app.command()
def classify(
    text: Annotated[str, typer.Argument(help="The query to judge.")],
    judge: JudgeKind = "classifier",
    config: ConfigOption = None,
    base_url: BaseUrlOption = None,
    model: ModelOption = None,
) -> None:
    """Print the label and class probabilities of one text as JSON."""
    the_judge, backend = _judge_for(judge, config, base_url, model)

    async def run() -> Any:
        try:
            return await the_judge.judge(text)
        finally:
            if backend is not None:
                await backend.aclose()

    j = asyncio.run(run())
    typer.echo(json.dumps({
        "label": j.label, "probabilities": {k: round(v, 4) for k, v in j.probabilities.items()},
        "judge": j.judge, "latency_ms": round(j.latency_ms, 3),
    }))
