#!/usr/bin/env python3
"""How good and how fast is the complexity judge? Scores and latency on the held-out split.

* `classifier` (the shipped model) and, as the same-run baseline, a `length-only` classifier
  fitted the same way on the same training split but seeing only the query's shape (length,
  sentences, question marks, numbers, code): what the words add over what a query looks like.
* The classifier's leave-one-domain-out cross-validation on the training split: the estimate
  for domains it never saw.
* `llm` and `cascade`, timed against the STREAM simulator standing in for the local model
  (TTFT 0, so the figure is the judge's own round trip: building the prompt, the HTTP call,
  strict parsing). No model weights can be downloaded here, so their accuracy is not measured:
  the simulator answers a fixed label.

Latency is measured in-process around `await judge.judge(text)`, cache off, after a warm-up.

    .venv/bin/python bench/judge.py              # about a minute
    .venv/bin/python bench/judge.py --skip-cv    # without the cross-validation

Results go to bench/results/judge-<time>.json; see docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from overhead import (
    LOOPBACK,
    REPO,
    Services,
    free_port,
    save_results,
    streamllm_exe,
    wait_ready,
)

DATA = REPO / "datasets" / "complexity"


async def timed(judge: Any, texts: list[str], warmup: int = 50) -> tuple[list[Any], list[float]]:
    for text in texts[:warmup]:
        await judge.judge(text)
    out, ms = [], []
    for text in texts:
        start = time.perf_counter()
        out.append(await judge.judge(text))
        ms.append((time.perf_counter() - start) * 1000)
    return out, ms


def start_judge_model(services: Services) -> str:
    """The simulator as the local model, in its own process as a real one would be."""
    port = free_port()
    config = services.workdir / "sim.yaml"
    config.write_text("models:\n  judge: {reply: MEDIUM}\n")
    svc = services.start("simulator", [streamllm_exe(), "sim", "--host", LOOPBACK, "--port",
                                       str(port), "--config", str(config)])
    base = f"http://{LOOPBACK}:{port}"
    wait_ready(svc, f"{base}/health", 30)
    return f"{base}/v1"


async def run(args: argparse.Namespace, sim_url: str) -> dict[str, Any]:
    from streamllm.config import COMPLEXITIES, TierSettings
    from streamllm.routing.judge import ClassifierJudge
    from streamllm.routing.judge.cascade import CascadeJudge
    from streamllm.routing.judge.features import extract
    from streamllm.routing.judge.linear import softmax
    from streamllm.routing.judge.llm import LLMJudge
    from streamllm.routing.judge.metrics import evaluate
    from streamllm.routing.judge.train import Params, cross_validate, fit, load_examples
    from streamllm.routing.policy import level_for
    from streamllm.tiers import OpenAIHTTPBackend
    from streamllm.tiers.adapt import backend_body

    train = load_examples(DATA / "train.jsonl")
    held = load_examples(DATA / "heldout.jsonl")
    texts, truth = [ex.text for ex in held], [ex.label for ex in held]
    results: dict[str, Any] = {"train": len(train), "heldout": len(held)}

    classifier = ClassifierJudge()
    judged, ms = await timed(classifier, texts)
    results["classifier"] = evaluate(truth, [level_for(j, args.high_threshold) for j in judged],
                                     ms)
    print(f"[bench] classifier: macro-F1 {results['classifier']['macro_f1']}", flush=True)

    # Same-run baseline: the same learner on shape features only.
    shape = [[f for f in extract(ex.text) if f.startswith("#")] for ex in train]
    shape_model = fit(shape, [ex.label for ex in train], Params())
    preds, shape_ms = [], []
    for text in texts:
        start = time.perf_counter()
        feats = [f for f in extract(text) if f.startswith("#")]
        probs = softmax(shape_model.scores(feats))
        preds.append(COMPLEXITIES[max(range(3), key=lambda c: probs[c])])
        shape_ms.append((time.perf_counter() - start) * 1000)
    results["length-only"] = evaluate(truth, preds, shape_ms)

    if not args.skip_cv:
        print("[bench] leave-one-domain-out cross-validation ...", flush=True)
        results["leave_one_domain_out"] = cross_validate(train, Params())

    # The LLM judge's own cost, against the simulator.
    tier = TierSettings(kind="vllm", base_url=sim_url, models=["judge"])
    backend = OpenAIHTTPBackend("local", tier)
    asked = 0

    async def complete(body: dict[str, Any]) -> dict[str, Any]:
        nonlocal asked
        asked += 1
        return await backend.complete(backend_body(body, "judge", tier, stream=False))

    try:
        llm = LLMJudge(complete, "judge", classifier, timeout_s=5.0)
        sample = texts[: args.llm_queries]
        judged, ms = await timed(llm, sample, warmup=20)
        results["llm_against_simulator"] = {
            "queries": len(sample), "fallbacks": llm.failures,
            "latency_ms": evaluate(truth[: len(sample)], [j.label for j in judged],
                                   ms)["latency_ms"]}
        cascade = CascadeJudge(classifier, llm, args.cascade_threshold)
        asked = 0
        judged, ms = await timed(cascade, texts, warmup=0)
        results["cascade_against_simulator"] = {
            "threshold": args.cascade_threshold, "queries": len(texts),
            "asked_llm": asked, "asked_llm_pct": round(100 * asked / len(texts), 1),
            "latency_ms": evaluate(truth, [j.label for j in judged], ms)["latency_ms"]}
    finally:
        await backend.aclose()
    return results


def report(r: dict[str, Any]) -> str:
    lines = [("| judge | macro-F1 | accuracy | HIGH recall | cost leak | free-tier retention "
             "| latency p50 | p95 | p99 |"), "|---|---|---|---|---|---|---|---|---|"]
    for name in ("classifier", "length-only"):
        e = r[name]
        lat = e["latency_ms"]
        lines.append(f"| {name} | {e['macro_f1']:.3f} | {e['accuracy']:.3f} | "
                     f"{e['high_recall']:.3f} | {e['cost_leak']:.3f} | "
                     f"{e['free_tier_retention_pct']:.1f} % | {lat['p50']:.3f} ms | "
                     f"{lat['p95']:.3f} ms | {lat['p99']:.3f} ms |")
    c = r["classifier"]
    lines += ["", "Classifier per class (held out): " + "; ".join(
        f"{k} P {v['precision']:.3f} R {v['recall']:.3f} F1 {v['f1']:.3f}"
        for k, v in c["per_class"].items()),
        f"Confusion matrix (rows true LOW, MEDIUM, HIGH): {c['confusion_matrix']}"]
    if "leave_one_domain_out" in r:
        cv = r["leave_one_domain_out"]
        worst = min(cv["per_domain_macro_f1"].items(), key=lambda kv: kv[1])
        lines.append(f"Leave one domain out (training split): macro-F1 {cv['macro_f1']:.3f}, "
                     f"HIGH recall {cv['high_recall']:.3f}, cost leak {cv['cost_leak']:.3f}; "
                     f"weakest domain {worst[0]} {worst[1]:.3f}")
    llm, cas = r["llm_against_simulator"], r["cascade_against_simulator"]
    lines.append(f"LLM judge against the simulator ({llm['queries']} queries, TTFT 0): p50 "
                 f"{llm['latency_ms']['p50']:.2f} ms, p95 {llm['latency_ms']['p95']:.2f} ms, "
                 f"p99 {llm['latency_ms']['p99']:.2f} ms; fallbacks {llm['fallbacks']}")
    lines.append(f"Cascade (threshold {cas['threshold']}): asked the LLM for {cas['asked_llm']} "
                 f"of {cas['queries']} ({cas['asked_llm_pct']} %); p50 "
                 f"{cas['latency_ms']['p50']:.3f} ms, p95 {cas['latency_ms']['p95']:.2f} ms, "
                 f"p99 {cas['latency_ms']['p99']:.2f} ms")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--high-threshold", type=float, default=0.5)
    p.add_argument("--cascade-threshold", type=float, default=0.6)
    p.add_argument("--llm-queries", type=int, default=300)
    p.add_argument("--skip-cv", action="store_true")
    args = p.parse_args(argv)
    started = time.monotonic()
    services = Services(Path(tempfile.mkdtemp(prefix="streamllm-bench-judge-")))
    try:
        results = asyncio.run(run(args, start_judge_model(services)))
    finally:
        services.stop_all()
        shutil.rmtree(services.workdir, ignore_errors=True)
    print()
    print(report(results))
    path = save_results("judge", vars(args), results=results)
    print(f"\n[bench] done in {time.monotonic() - started:.0f}s; results in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
