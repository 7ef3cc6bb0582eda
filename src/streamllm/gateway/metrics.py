"""`/metrics` in Prometheus' text format: requests, latencies, tokens, cost, judge, fallbacks,
relay channels and streams in flight. One registry per app (tests build many apps).

Labels are tiers, outcomes and judges: a handful of values each, never a key, model or prompt.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

# Time to first token spans a local model's tens of ms to a cold HPC job's minutes.
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
GAP_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5)
JUDGE_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 2)


class Metrics:
    def __init__(self, inflight: Callable[[], int], relay_channels: Callable[[], int | None]):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("stream_requests", "Chat completion requests by tier and outcome",
                                ["tier", "outcome"], registry=r)
        self.ttft = Histogram("stream_time_to_first_token_seconds",
                              "Request arrival to the first token sent, by tier", ["tier"],
                              buckets=TTFT_BUCKETS, registry=r)
        self.gap = Histogram("stream_inter_token_seconds",
                             "Time between successive streamed writes, by tier", ["tier"],
                             buckets=GAP_BUCKETS, registry=r)
        self.tokens = Counter("stream_tokens", "Tokens by tier and direction (prompt or "
                              "completion), as the backends report them",
                              ["tier", "direction"], registry=r)
        self.cost = Counter("stream_cost_usd", "Cost in USD by tier", ["tier"], registry=r)
        self.judge = Histogram("stream_judge_seconds", "Complexity judge latency by judge",
                               ["judge"], buckets=JUDGE_BUCKETS, registry=r)
        self.fallbacks = Counter("stream_fallbacks", "Tiers that failed before the first token "
                                 "and were replaced by the next candidate", ["tier"], registry=r)
        self.summaries = Counter("stream_summaries", "Conversation summaries written, by method",
                                 ["method"], registry=r)
        r.register(_Live(inflight, relay_channels))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _Live:
    """Values read when scraped rather than kept up to date on every request."""

    def __init__(self, inflight: Callable[[], int], relay_channels: Callable[[], int | None]):
        self.inflight = inflight
        self.relay_channels = relay_channels

    def describe(self):
        return []

    def collect(self):
        yield GaugeMetricFamily("stream_inflight_requests",
                                "Chat completion requests in progress", value=self.inflight())
        channels = self.relay_channels()
        if channels is not None:
            yield GaugeMetricFamily("stream_relay_channels",
                                    "Channels open on the in-process relay", value=channels)


CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
