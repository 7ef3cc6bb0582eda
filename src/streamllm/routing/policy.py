"""Which tier and model serve a request, and in what order to fall back (pure: no I/O).

An explicit model wins. For `auto` the judge's probabilities pick a complexity level (HIGH only
when P(HIGH) reaches the threshold, which a spent budget raises), the level's chain gives the
tiers in order, and then, in this order: privacy (sensitive data or a caller that forbids the
cloud removes it), context size (a tier whose window cannot hold the request is skipped) and
health (a tier that just failed is tried last). Privacy is applied to every candidate, so no
fallback can break it. The route's reasons say what happened, for `x-stream-route-reason`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from streamllm.config import COMPLEXITIES, TIERS, Complexity, RoutingSettings
from streamllm.errors import (
    CloudNotAllowed,
    ContextTooLong,
    ModelNotFound,
    TierNotAllowed,
    TierUnavailable,
)
from streamllm.routing.judge import Judgement

MAX_ALIAS_DEPTH = 8
IN_HOUSE = ("local", "hpc")  # tiers whose data stays inside the institution


@dataclass(frozen=True)
class Candidate:
    tier: str
    model: str


@dataclass(frozen=True)
class RequestFacts:
    """What the gateway learnt about a request before routing it."""

    allow_cloud: bool = True  # the caller's (key's and request's) wish, before configuration
    allowed_tiers: frozenset[str] | None = None  # the caller's key's tiers; None: every tier
    sensitive: str | None = None  # the kind of sensitive data found in it, if any
    prompt_tokens: int = 0  # estimated tokens the whole request needs (prompt + answer)
    # What it needs at least once older turns are summarised (system messages, the latest user
    # turn, the answer); None: it cannot be summarised, so the whole must fit.
    min_tokens: int | None = None
    full_context: bool = False  # the caller wants the whole conversation, unsummarised
    high_threshold: float | None = None  # P(HIGH) needed after the budget; None: configured


@dataclass(frozen=True)
class Route:
    candidates: list[Candidate]
    complexity: str | None  # None when the caller named the model (no judging happened)
    reasons: list[str] = field(default_factory=list)
    judgement: Judgement | None = None

    @property
    def reason(self) -> str:
        return ",".join(self.reasons)


def level_for(judgement: Judgement, threshold: float) -> Complexity:
    """HIGH when P(HIGH) reaches the threshold, otherwise the likelier of LOW and MEDIUM."""
    if judgement.p("HIGH") >= threshold:
        return "HIGH"
    return "LOW" if judgement.p("LOW") >= judgement.p("MEDIUM") else "MEDIUM"


class RoutingPolicy:
    def __init__(
        self,
        settings: RoutingSettings,
        catalogue: Mapping[str, Sequence[str]],
        aliases: Mapping[str, str] | None = None,
        windows: Mapping[str, int | None] | None = None,
    ):
        self.settings = settings
        self.catalogue = catalogue  # tier -> models it serves, first is the default; live view
        self.aliases = dict(aliases or {})
        self.windows = windows if windows is not None else {}  # tier -> context window, if known

    def _default(self, tier: str) -> Candidate | None:
        models = self.catalogue.get(tier)
        return Candidate(tier, models[0]) if models else None

    def resolve_alias(self, name: str) -> str:
        seen = 0
        while name in self.aliases and seen < MAX_ALIAS_DEPTH:
            name, seen = self.aliases[name], seen + 1
        return name

    def needs_judgement(self, model: str) -> bool:
        return self.resolve_alias(model) == "auto"

    def route(
        self,
        model: str,
        facts: RequestFacts = RequestFacts(),
        judgement: Judgement | None = None,
        *,
        healthy: Callable[[str], bool] = lambda tier: True,
    ) -> Route:
        allow_cloud = facts.allow_cloud and self.settings.allow_cloud
        name = self.resolve_alias(model)
        if name == "auto":
            if judgement is None:
                raise ValueError("auto routing needs the judge's judgement")
            return self._auto(judgement, facts, allow_cloud, healthy)
        explicit = self._explicit(name, model)
        if facts.allowed_tiers is not None and explicit.tier not in facts.allowed_tiers:
            raise TierNotAllowed(
                f"model '{model}' is on the {explicit.tier} tier, which your API key may not "
                f"use (it may use {', '.join(sorted(facts.allowed_tiers)) or 'no tier'})",
                param="model",
            )
        if explicit.tier not in IN_HOUSE and facts.sensitive:
            raise CloudNotAllowed(
                f"model '{model}' is on the {explicit.tier} tier, and this request appears to "
                f"contain sensitive data ({facts.sensitive}), which stays on in-house tiers; "
                "use auto, local or hpc",
                param="model",
            )
        if explicit.tier == "cloud" and not allow_cloud:
            raise CloudNotAllowed(
                f"model '{model}' is on the cloud tier, and cloud use is not allowed here "
                "(allow_cloud is false in the configuration, for this key or in this request)",
                param="model",
            )
        candidates = [explicit]
        if self.settings.fallback_on_explicit:
            level = next(
                (lv for lv in COMPLEXITIES if self.settings.tier_for.get(lv) == explicit.tier),
                "MEDIUM",
            )
            rest = [
                c for t in self.settings.chain(level) if t != explicit.tier
                if (c := self._default(t))
            ]
            candidates += sorted(self._allowed(rest, allow_cloud, facts), key=lambda c:
                                 not healthy(c.tier))
        return Route(candidates, None, ["explicit"])

    def _allowed(self, candidates: list[Candidate], allow_cloud: bool,
                 facts: RequestFacts) -> list[Candidate]:
        return [c for c in candidates
                if (allow_cloud or c.tier != "cloud")
                and (facts.allowed_tiers is None or c.tier in facts.allowed_tiers)
                and (not facts.sensitive or c.tier in IN_HOUSE)]

    def _auto(self, judgement: Judgement, facts: RequestFacts, allow_cloud: bool,
              healthy: Callable[[str], bool]) -> Route:
        base = self.settings.high_threshold
        threshold = base if facts.high_threshold is None else facts.high_threshold
        level = level_for(judgement, threshold)
        # The budget, not the judge, kept it off the HIGH tier.
        budgeted = level != "HIGH" and level_for(judgement, base) == "HIGH"
        reasons = ["budget" if budgeted else f"judge:{level}"]
        candidates = [c for t in self.settings.chain(level) if (c := self._default(t))]
        if not candidates:
            raise TierUnavailable("no tier is configured that this request may use")
        first = candidates[0]

        kept = self._allowed(candidates, allow_cloud, facts)
        if facts.sensitive and len(kept) < len(candidates):
            reasons.append(f"privacy:{facts.sensitive}")
        elif first not in kept:
            forbidden = first.tier == "cloud" and not allow_cloud
            reasons.append("no-cloud" if forbidden else f"not-allowed:{first.tier}")
        if not kept:
            raise TierUnavailable("no tier is configured that this request may use")

        # A HIGH query, or a caller who asks for it, gets a tier that holds the whole
        # conversation; others may have their older turns summarised to fit a smaller one.
        whole = level == "HIGH" or facts.full_context or facts.min_tokens is None
        need = facts.prompt_tokens if whole else facts.min_tokens or 0
        fits = [c for c in kept if self._fits(c.tier, need)]
        if not fits and whole and not facts.full_context and facts.min_tokens is not None:
            need = facts.min_tokens  # nothing holds it all: summarise rather than fail
            fits = [c for c in kept if self._fits(c.tier, need)]
        if not fits:
            raise ContextTooLong(
                f"This request needs about {need} tokens, more than the context window of any "
                "tier it may use "
                f"({', '.join(f'{c.tier}: {self.windows.get(c.tier)}' for c in kept)}). "
                "Please reduce the length of the messages or completion.",
                param="messages",
            )
        for c in kept:
            if c not in fits:
                reasons.append(f"context:{c.tier}-too-small")
        # Tiers that just failed go last, not away: a stale health view must not leave a
        # request with nowhere to go.
        ordered = sorted(fits, key=lambda c: not healthy(c.tier))
        if ordered[0] != fits[0]:
            reasons.append(f"fallback:{fits[0].tier}-down")
        return Route(ordered, judgement.label, reasons, judgement)

    def _fits(self, tier: str, tokens: int) -> bool:
        window = self.windows.get(tier)
        return window is None or tokens <= window

    def _explicit(self, name: str, asked: str) -> Candidate:
        if name in TIERS:
            found = self._default(name)
            if found is None:
                what = "has no models" if name in self.catalogue else "is not configured"
                raise ModelNotFound(f"the {name} tier {what}", param="model")
            return found
        tier, sep, rest = name.partition("/")
        if sep and tier in TIERS:
            if rest in self.catalogue.get(tier, ()):
                return Candidate(tier, rest)
            raise ModelNotFound(
                f"The model `{asked}` does not exist: the {tier} tier serves "
                f"{', '.join(self.catalogue.get(tier, ())) or 'no models'}",
                param="model",
            )
        for tier in TIERS:
            if name in self.catalogue.get(tier, ()):
                return Candidate(tier, name)
        raise ModelNotFound(
            f"The model `{asked}` does not exist. Use auto, local, hpc, cloud, or a model "
            "listed by GET /v1/models.",
            param="model",
        )
