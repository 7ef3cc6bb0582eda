"""Which tier and model serve a request, and in what order to fall back (pure: no I/O).

An explicit model wins; `auto` asks the judge and follows the fallback chain for its label.
Privacy (`allow_cloud`) is applied last, to every candidate, so no fallback can break it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from streamllm.config import COMPLEXITIES, TIERS, RoutingSettings
from streamllm.errors import CloudNotAllowed, ModelNotFound, TierUnavailable
from streamllm.routing.judge import Judgement, RulesJudge

MAX_ALIAS_DEPTH = 8


@dataclass(frozen=True)
class Candidate:
    tier: str
    model: str


@dataclass(frozen=True)
class Route:
    candidates: list[Candidate]
    complexity: str | None  # None when the caller named the model (no judging happened)
    reason: str
    judgement: Judgement | None = None


class RoutingPolicy:
    def __init__(
        self,
        settings: RoutingSettings,
        catalogue: Mapping[str, Sequence[str]],
        aliases: Mapping[str, str] | None = None,
        judge: RulesJudge | None = None,
    ):
        self.settings = settings
        self.catalogue = catalogue  # tier -> models it serves, first is the default; live view
        self.aliases = dict(aliases or {})
        self.judge = judge or RulesJudge()

    def _default(self, tier: str) -> Candidate | None:
        models = self.catalogue.get(tier)
        return Candidate(tier, models[0]) if models else None

    def resolve_alias(self, name: str) -> str:
        seen = 0
        while name in self.aliases and seen < MAX_ALIAS_DEPTH:
            name, seen = self.aliases[name], seen + 1
        return name

    def route(
        self,
        model: str,
        latest_user_text: str,
        *,
        allow_cloud: bool = True,
        healthy: Callable[[str], bool] = lambda tier: True,
    ) -> Route:
        allow_cloud = allow_cloud and self.settings.allow_cloud
        name = self.resolve_alias(model)
        if name == "auto":
            judgement = self.judge.judge(latest_user_text)
            chain = self.settings.chain(judgement.label)
            candidates = [c for t in chain if (c := self._default(t))]
            return self._finish(
                candidates, judgement.label, f"judge: {judgement.reason}", allow_cloud, healthy,
                judgement, reorder=True,
            )
        explicit = self._explicit(name, model)
        if explicit.tier == "cloud" and not allow_cloud:
            raise CloudNotAllowed(
                f"model '{model}' is on the cloud tier, and cloud use is not allowed here "
                "(allow_cloud is false in the configuration or in this request)",
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
            candidates += sorted(rest, key=lambda c: not healthy(c.tier))
        return self._finish(candidates, None, f"explicit model '{model}'", allow_cloud, healthy)

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

    def _finish(
        self,
        candidates: list[Candidate],
        complexity: str | None,
        reason: str,
        allow_cloud: bool,
        healthy: Callable[[str], bool],
        judgement: Judgement | None = None,
        reorder: bool = False,
    ) -> Route:
        if not allow_cloud:
            candidates = [c for c in candidates if c.tier != "cloud"]
        if reorder:
            # Tiers that just failed go last, not away: a stale health view must not leave a
            # request with nowhere to go.
            candidates = sorted(candidates, key=lambda c: not healthy(c.tier))
        if not candidates:
            raise TierUnavailable("no tier is configured that this request may use")
        return Route(candidates, complexity, reason, judgement)
