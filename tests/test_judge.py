"""The complexity judges: classifier, LLM (against the simulator), cascade, cache, evaluation,
training and the dataset they learn from."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from streamllm.config import JudgeSettings, TierSettings
from streamllm.routing.judge import ClassifierJudge, build_judge
from streamllm.routing.judge.cache import CachedJudge
from streamllm.routing.judge.cascade import CascadeJudge
from streamllm.routing.judge.classifier import load_model
from streamllm.routing.judge.features import extract
from streamllm.routing.judge.linear import LinearModel
from streamllm.routing.judge.llm import LLMJudge, UnreadableLabel, parse_label
from streamllm.routing.judge.metrics import evaluate
from streamllm.routing.judge.train import Example, Params, load_examples, split, train_classifier
from streamllm.tiers import OpenAIHTTPBackend
from streamllm.tiers.adapt import backend_body
from tests.test_cli import STREAMLLM, clean_env

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "datasets" / "complexity"
SMALL = Path(__file__).parent / "fixtures" / "judge_small.jsonl"


# -- the dataset ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dataset() -> tuple[list[Example], list[Example]]:
    return load_examples(DATA / "train.jsonl"), load_examples(DATA / "heldout.jsonl")


def test_dataset_is_large_balanced_and_spans_the_domains(dataset):
    train, held = dataset
    everything = train + held
    assert len(everything) >= 3000
    assert len({ex.domain for ex in everything}) >= 11  # ten domains plus everyday chat
    counts = Counter(ex.label for ex in everything)
    assert max(counts.values()) - min(counts.values()) <= len(everything) * 0.02
    assert len({ex.text.strip().lower() for ex in everything}) == len(everything), "duplicates"


def test_no_question_form_gives_the_label_away(dataset):
    train, held = dataset
    yes_no = re.compile(r"^(is|are|does|do|can|should|could|would|will|was|were|did)\b", re.IGNORECASE)
    what_is = re.compile(r"\bwhat(?: is|'s| are)\b", re.IGNORECASE)
    for form in (yes_no, what_is):
        by_label = Counter(ex.label for ex in train + held if form.search(ex.text))
        assert min(by_label[lb] for lb in ("LOW", "MEDIUM", "HIGH")) >= 50, (form, by_label)


def test_the_held_out_split_never_reaches_training(dataset):
    train, held = dataset
    assert not {ex.text for ex in train} & {ex.text for ex in held}
    # The split is a pure function of the data: recomputing it gives the committed files.
    _again_train, again_held = split(train + held)
    assert {ex.text for ex in again_held} == {ex.text for ex in held}
    assert load_model().meta["trained_on"] == len(train)


def test_shipped_classifier_meets_its_targets_on_the_held_out_split(dataset):
    _, held = dataset
    judge = ClassifierJudge()
    predicted = [judge.classify(ex.text).label for ex in held]
    result = evaluate([ex.label for ex in held], predicted)
    assert result["macro_f1"] >= 0.70
    assert result["high_recall"] >= 0.80
    assert result["cost_leak"] <= 0.15


# -- classifier ----------------------------------------------------------------------------------


def test_classifier_is_deterministic_and_its_probabilities_sum_to_one():
    judge = ClassifierJudge()
    text = "Derive the update rule for Adam from first principles and compare it with RMSProp."
    first = judge.classify(text)
    for _ in range(3):
        again = ClassifierJudge(LinearModel.from_json(load_model().to_json())).classify(text)
        assert again.probabilities == first.probabilities
    assert sum(first.probabilities.values()) == pytest.approx(1.0)
    assert first.label == max(first.probabilities, key=first.probabilities.get)


def test_training_is_deterministic(dataset):
    train, _ = dataset
    small = [ex for i, ex in enumerate(train) if i % 12 == 0]
    params = Params(epochs=3)
    assert train_classifier(small, params).to_json() == train_classifier(small, params).to_json()


def test_a_short_follow_up_is_read_with_the_turn_before_it():
    judge = ClassifierJudge()
    hard = ("Design a checkpoint/restart protocol for a 4000-rank MPI solver on a machine "
            "with frequent node failures, and justify the interval you choose.")
    easy = "what's the capital of france"
    follow = "and for the second one?"
    after_hard = judge.classify(follow, [hard])
    after_easy = judge.classify(follow, [easy])
    assert after_hard.p("HIGH") > after_easy.p("HIGH")
    # A turn that stands on its own is judged on its own words, whatever came before.
    standalone = "Thanks, that's all I needed!"
    assert judge.classify(standalone, [hard]).probabilities == judge.classify(
        standalone).probabilities


def test_a_pasted_attachment_does_not_drive_the_label():
    question = "What does this error mean?"
    log = "\n".join(f"[{i:06d}] slurmstepd: task {i} exited with exit code 0" for i in range(4000))
    feats_short = set(extract(question))
    feats_long = set(extract(question + "\n" + log))
    # Only the head and tail of a long message are read: the features stay bounded.
    assert len(feats_long) < 400
    assert feats_short & feats_long >= {"^what", "w:error", "w:mean"}


# -- metrics and `judge eval` ----------------------------------------------------------------------


def test_metrics_match_a_hand_computed_case():
    truth = ["LOW", "LOW", "MEDIUM", "MEDIUM", "HIGH", "HIGH"]
    pred = ["LOW", "HIGH", "MEDIUM", "LOW", "HIGH", "MEDIUM"]
    r = evaluate(truth, pred, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    assert r["confusion_matrix"] == [[1, 0, 1], [1, 1, 0], [0, 1, 1]]
    assert r["accuracy"] == 0.5
    assert r["per_class"]["LOW"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert r["macro_f1"] == 0.5
    assert r["high_recall"] == 0.5
    assert r["cost_leak"] == 0.25  # one of the four non-HIGH queries was predicted HIGH
    assert r["free_tier_retention_pct"] == 75.0
    assert r["latency_ms"] == {"p50": 3.0, "p95": 6.0, "p99": 6.0}


def test_judge_eval_prints_the_documented_json(tmp_path):
    out = subprocess.run([STREAMLLM, "judge", "eval", "--dataset", str(SMALL)],
                         capture_output=True, text=True, timeout=60, env=clean_env(XDG_DATA_HOME=str(tmp_path)), check=False)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    for key in ("accuracy", "macro_f1", "per_class", "confusion_matrix",
                "free_tier_retention_pct", "high_recall", "cost_leak", "latency_ms"):
        assert key in result, key
    assert set(result["per_class"]) == {"LOW", "MEDIUM", "HIGH"}
    assert set(result["latency_ms"]) == {"p50", "p95", "p99"}
    # The numbers are those of the classifier applied line by line.
    examples = load_examples(SMALL)
    judge = ClassifierJudge()
    expected = evaluate([ex.label for ex in examples],
                        [judge.classify(ex.text).label for ex in examples])
    assert result["confusion_matrix"] == expected["confusion_matrix"]
    assert result["macro_f1"] == expected["macro_f1"]
    assert sum(map(sum, result["confusion_matrix"])) == len(examples)


def test_judge_classify_and_bad_datasets(tmp_path):
    env = clean_env(XDG_DATA_HOME=str(tmp_path))
    out = subprocess.run([STREAMLLM, "judge", "classify", "thanks so much!"],
                         capture_output=True, text=True, timeout=60, env=env, check=False)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["label"] == "LOW" and set(doc["probabilities"]) == {"LOW", "MEDIUM", "HIGH"}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "hi", "ground_truth": "EASY"}\n')
    out = subprocess.run([STREAMLLM, "judge", "eval", "--dataset", str(bad)],
                         capture_output=True, text=True, timeout=60, env=env, check=False)
    assert out.returncode == 2 and "bad.jsonl:1" in out.stderr


def test_judge_train_writes_a_model_that_loads(tmp_path):
    data = tmp_path / "train.jsonl"
    lines = [json.loads(ln) for ln in (DATA / "train.jsonl").read_text().splitlines()][::10]
    data.write_text("".join(json.dumps(d) + "\n" for d in lines))
    model = tmp_path / "model.json"
    out = subprocess.run([STREAMLLM, "judge", "train", "--data", str(data), "--out", str(model),
                          "--no-cv"], capture_output=True, text=True, timeout=120,
                         env=clean_env(XDG_DATA_HOME=str(tmp_path)), check=False)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["examples"] == len(lines)
    trained = ClassifierJudge(LinearModel.load(model))
    assert trained.classify("hello there").label in ("LOW", "MEDIUM", "HIGH")


# -- LLM judge against the simulator -------------------------------------------------------------


def test_parse_label_is_strict():
    def reply(content):
        return {"choices": [{"message": {"content": content}}]}

    assert parse_label(reply("HIGH")) == "HIGH"
    assert parse_label(reply(" low.\n")) == "LOW"
    for junk in ("", "HIGH MEDIUM", "The answer is HIGH", "HIGHEST", "MEDIUM!!", None):
        with pytest.raises(UnreadableLabel):
            parse_label(reply(junk))
    for broken in ({}, {"choices": []}, {"choices": [{}]}, "HIGH", None):
        with pytest.raises(UnreadableLabel):
            parse_label(broken)


def llm_judge_for(sim, model: str, timeout_s: float = 2.0) -> tuple[LLMJudge, OpenAIHTTPBackend]:
    tier = TierSettings(kind="vllm", base_url=sim.url, models=[model])
    backend = OpenAIHTTPBackend("local", tier)

    async def complete(body):
        return await backend.complete(backend_body(body, model, tier, stream=False))

    return LLMJudge(complete, model, ClassifierJudge(), timeout_s), backend


async def test_llm_judge_reads_a_clean_label(start_sim):
    sim = start_sim({"judge": {"reply": "HIGH"}})
    judge, backend = llm_judge_for(sim, "judge")
    try:
        j = await judge.judge("thanks!", ["earlier turn"])
    finally:
        await backend.aclose()
    assert (j.label, j.judge, j.probabilities["HIGH"]) == ("HIGH", "llm", 1.0)
    sent = sim.sim.log[0].body
    assert sent["max_tokens"] == 4 and sent["temperature"] == 0
    assert "thanks!" in sent["messages"][-1]["content"]
    assert "earlier turn" in sent["messages"][-1]["content"]


@pytest.mark.parametrize("spec", [
    {"reply": "Well, I would say this is probably quite HIGH."},  # junk
    {"reply": ""},  # empty
    {"reply": "HIGH", "ttft_ms": 3000},  # slow: past the judge's timeout
    {"reply": "HIGH", "error_rate": 1.0},  # the backend fails
])
async def test_llm_judge_falls_back_to_the_classifier(start_sim, spec):
    sim = start_sim({"judge": spec})
    judge, backend = llm_judge_for(sim, "judge", timeout_s=0.3)
    text = "hi, how are you?"
    started = time.monotonic()
    try:
        j = await judge.judge(text)
    finally:
        await backend.aclose()
    assert time.monotonic() - started < 2.0, "the timeout bounds a slow model"
    assert j.judge == "llm->classifier"
    assert j.probabilities == ClassifierJudge().classify(text).probabilities
    assert judge.failures == 1
    assert len(sim.sim.log) == 1, "the model was asked once"


async def test_cascade_asks_the_model_only_when_the_classifier_is_unsure(start_sim):
    sim = start_sim({"judge": {"reply": "MEDIUM"}})
    llm, backend = llm_judge_for(sim, "judge")
    try:
        sure = await CascadeJudge(ClassifierJudge(), llm, threshold=0.0).judge("hello!")
        assert sure.judge == "cascade:classifier" and len(sim.sim.log) == 0
        unsure = await CascadeJudge(ClassifierJudge(), llm, threshold=1.01).judge("hello!")
        assert (unsure.judge, unsure.label) == ("cascade:llm", "MEDIUM")
        assert len(sim.sim.log) == 1
    finally:
        await backend.aclose()


async def test_cache_judges_a_repeated_query_once_and_stays_bounded(start_sim):
    sim = start_sim({"judge": {"reply": "LOW"}})
    llm, backend = llm_judge_for(sim, "judge")
    cached = CachedJudge(llm, size=2)
    try:
        a = await cached.judge("first")
        b = await cached.judge("first")
        assert (a.label, b.label, b.cached) == ("LOW", "LOW", True)
        assert len(sim.sim.log) == 1
        await cached.judge("first", ["with context"])  # another key
        await cached.judge("second")
        assert len(sim.sim.log) == 3
        await cached.judge("first")  # evicted by the two after it: asked again
        assert len(sim.sim.log) == 4
    finally:
        await backend.aclose()


def test_build_judge_needs_a_model_for_llm_and_cascade():
    with pytest.raises(ValueError, match="needs"):
        build_judge(JudgeSettings(kind="llm"))
    assert build_judge(JudgeSettings(cache_size=0)).name == "classifier"
    assert isinstance(build_judge(JudgeSettings()), CachedJudge)


def test_classifier_latency_is_far_below_a_millisecond():
    # Not a timing assertion on the machine: it counts work. Scoring touches each feature once.
    judge = ClassifierJudge()
    feats = extract("Write a Python function that reverses a linked list in place.")
    assert len(feats) < 80
    assert asyncio.run(judge.judge("hi")).latency_ms >= 0


def test_judge_eval_with_the_llm_judge_asks_the_named_server(start_sim, tmp_path):
    sim = start_sim({"judge": {"reply": "HIGH"}})
    out = subprocess.run([STREAMLLM, "judge", "eval", "--dataset", str(SMALL), "--judge", "llm",
                          "--base-url", sim.url, "--model", "judge"],
                         capture_output=True, text=True, timeout=60,
                         env=clean_env(XDG_DATA_HOME=str(tmp_path)), check=False)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    n = len(load_examples(SMALL))
    assert [row[2] for row in result["confusion_matrix"]] == [4, 4, 4], "all judged HIGH"
    assert result["llm_fallbacks"] == 0 and len(sim.sim.log) == n
