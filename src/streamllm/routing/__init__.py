"""Routing: judge a request's complexity and turn it into an ordered list of tier candidates."""

from streamllm.routing.judge import Judgement, RulesJudge
from streamllm.routing.policy import Candidate, Route, RoutingPolicy

__all__ = ["Candidate", "Judgement", "Route", "RoutingPolicy", "RulesJudge"]
