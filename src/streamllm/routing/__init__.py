"""Routing: judge a request's complexity and turn it into an ordered list of tier candidates."""

from streamllm.routing.judge import Judgement
from streamllm.routing.policy import Candidate, RequestFacts, Route, RoutingPolicy

__all__ = ["Candidate", "Judgement", "RequestFacts", "Route", "RoutingPolicy"]
