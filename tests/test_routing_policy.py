"""The routing policy on its own (pure): levels, chains, privacy, budget, context, health, and
the reasons it gives."""

from __future__ import annotations

import itertools

import pytest

from streamllm.config import Price, RoutingSettings
from streamllm.errors import CloudNotAllowed, ContextTooLong, ModelNotFound
from streamllm.routing.budget import SpendLedger, cost_usd, effective_high_threshold
from streamllm.routing.judge import Judgement
from streamllm.routing.policy import RequestFacts, RoutingPolicy, level_for

CATALOGUE = {"local": ["llama"], "hpc": ["big", "bigger"], "cloud": ["gpt"]}


def policy(windows=None, **routing) -> RoutingPolicy:
    return RoutingPolicy(RoutingSettings(**routing), CATALOGUE, {"fast": "local", "x": "y"},
                         windows)


def judged(low: float, medium: float, high: float) -> Judgement:
    probs = {"LOW": low, "MEDIUM": medium, "HIGH": high}
    return Judgement(max(probs, key=probs.get), probs, 0.01, "classifier")


LOW, MEDIUM, HIGH = judged(0.9, 0.08, 0.02), judged(0.1, 0.8, 0.1), judged(0.02, 0.08, 0.9)


def tiers_of(route):
    return [c.tier for c in route.candidates]


def test_each_level_follows_its_chain_and_says_so():
    p = policy()
    for judgement, chain in ((LOW, ["local", "hpc", "cloud"]), (MEDIUM, ["hpc", "cloud", "local"]),
                             (HIGH, ["cloud", "hpc", "local"])):
        route = p.route("auto", RequestFacts(), judgement)
        assert tiers_of(route) == chain
        assert route.reason == f"judge:{judgement.label}"
        assert route.complexity == judgement.label


def test_high_needs_its_threshold_of_probability():
    unsure = judged(0.1, 0.35, 0.55)
    assert level_for(unsure, 0.5) == "HIGH"
    assert level_for(unsure, 0.6) == "MEDIUM", "below the threshold: the likelier of the rest"
    assert tiers_of(policy(high_threshold=0.6).route("auto", RequestFacts(), unsure))[0] == "hpc"


def test_unhealthy_first_choice_goes_last_and_the_reason_says_so():
    route = policy().route("auto", RequestFacts(), LOW, healthy=lambda t: t != "local")
    assert tiers_of(route) == ["hpc", "cloud", "local"], "unhealthy tiers go last, not away"
    assert route.reasons == ["judge:LOW", "fallback:local-down"]


def test_cloud_is_never_a_candidate_when_disallowed_anywhere():
    for p, facts in ((policy(), RequestFacts(allow_cloud=False)),
                     (policy(allow_cloud=False), RequestFacts(allow_cloud=True))):
        for judgement in (LOW, MEDIUM, HIGH):
            route = p.route("auto", facts, judgement, healthy=lambda t: t == "cloud")
            assert "cloud" not in tiers_of(route)
    assert policy().route("auto", RequestFacts(allow_cloud=False), HIGH).reasons == [
        "judge:HIGH", "no-cloud"]


def test_sensitive_data_pins_the_request_in_house():
    route = policy().route("auto", RequestFacts(sensitive="email"), HIGH)
    assert tiers_of(route) == ["hpc", "local"]
    assert route.reasons == ["judge:HIGH", "privacy:email"]
    with pytest.raises(CloudNotAllowed, match="sensitive data"):
        policy().route("cloud", RequestFacts(sensitive="card"))
    assert tiers_of(policy().route("hpc", RequestFacts(sensitive="card"))) == ["hpc"]
    # Fallback after an explicit in-house model never reaches the cloud either.
    p = policy(fallback_on_explicit=True)
    assert "cloud" not in tiers_of(p.route("hpc", RequestFacts(sensitive="api_key")))


def test_a_spent_budget_keeps_high_queries_off_the_cloud():
    threshold = effective_high_threshold(0.5, spent=10.0, budget=10.0, soft_start=0.5)
    route = policy().route("auto", RequestFacts(high_threshold=threshold), HIGH)
    assert tiers_of(route)[0] == "hpc"
    assert route.reasons == ["budget"]
    assert route.complexity == "HIGH", "the judge's own label is still reported"


def test_budget_threshold_rises_smoothly_from_the_soft_start():
    values = [effective_high_threshold(0.5, spent, 100.0, 0.5) for spent in range(0, 101, 5)]
    assert values[:11] == [0.5] * 11, "nothing changes before half the budget is spent"
    assert all(a <= b for a, b in itertools.pairwise(values))
    steps = [b - a for a, b in itertools.pairwise(values)]
    assert max(steps) < 0.1, "no jump"
    assert values[-1] > 1.0, "a spent budget sends nothing to the cloud by the judge's choice"
    assert effective_high_threshold(0.5, 1e9, None, 0.5) == 0.5


def test_cost_uses_the_providers_figure_or_the_price_table():
    price = Price(input_per_mtok=2.0, output_per_mtok=8.0)
    usage = {"prompt_tokens": 1000, "completion_tokens": 500}
    assert cost_usd(usage, price) == pytest.approx(0.006)
    assert cost_usd({**usage, "cost": 0.5}, price) == 0.5
    assert cost_usd(usage, None) == 0.0
    assert cost_usd(None, price) == 0.0
    ledger = SpendLedger()
    ledger.add("alice", 1.5)
    ledger.add(None, 0.5)
    assert (ledger.spent("alice"), ledger.spent("bob"), ledger.spent()) == (1.5, 0.0, 2.0)


def test_a_tier_too_small_for_the_request_is_skipped():
    p = policy(windows={"local": 8192, "hpc": 32768, "cloud": 128000})
    route = p.route("auto", RequestFacts(prompt_tokens=20000), LOW)
    assert tiers_of(route) == ["hpc", "cloud"]
    assert route.reasons == ["judge:LOW", "context:local-too-small"]
    with pytest.raises(ContextTooLong) as err:
        p.route("auto", RequestFacts(prompt_tokens=200000), LOW)
    assert err.value.code == "context_length_exceeded" and err.value.status == 400
    # An unknown window never excludes a tier.
    assert tiers_of(policy().route("auto", RequestFacts(prompt_tokens=10**6), LOW))[0] == "local"


def test_explicit_names():
    p = policy()
    assert p.route("hpc").candidates[0].model == "big"
    assert p.route("hpc/bigger").candidates[0].model == "bigger"
    assert p.route("bigger").candidates[0].tier == "hpc"
    assert tiers_of(p.route("fast")) == ["local"]
    assert p.route("hpc").complexity is None
    assert p.route("hpc").reason == "explicit"
    with pytest.raises(ModelNotFound):
        p.route("hpc/nope")
    with pytest.raises(ModelNotFound):
        p.route("x")
    with pytest.raises(CloudNotAllowed):
        p.route("cloud/gpt", RequestFacts(allow_cloud=False))
    assert tiers_of(policy(fallback_on_explicit=True).route("hpc")) == ["hpc", "cloud", "local"]
    assert p.needs_judgement("auto") and not p.needs_judgement("hpc")


def test_an_invalid_privacy_pattern_is_a_configuration_error(tmp_path):
    from streamllm.config import load_settings
    from streamllm.errors import ConfigError

    config = tmp_path / "c.yaml"
    config.write_text("routing:\n  privacy:\n    patterns:\n      project: 'ZX-(\\d+'\n")
    with pytest.raises(ConfigError, match="patterns.project"):
        load_settings(config, environ={})
