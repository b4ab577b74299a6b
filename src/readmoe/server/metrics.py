"""Prometheus metrics of a running server (``GET /metrics``, text exposition format).

Latencies are observed on the engine loop thread the moment a token leaves a step, from
when the request was submitted (after parsing and tokenisation): TTFT, the gap between
consecutive tokens, and end to end. Engine gauges (running and waiting requests, KV blocks,
expert-cache counters) are read at scrape time from the loop's last published
``EngineState``, so a scrape never touches the engine itself. Each server has its own
registry: several apps in one process (tests) do not share counters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from readmoe.serve.engine import RequestOutput
from readmoe.server.bridge import EngineState
from readmoe.server.protocol import FINISH_REASONS

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0, 120.0)


class _EngineCollector(Collector):
    def __init__(self, state: Callable[[], EngineState]) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        s = self.state()
        gauges = {"requests_running": ("requests the engine has started (admitted to the KV "
                                       "cache and scheduled at least once)", s.running),
                  "requests_waiting": ("requests accepted but not started yet: what "
                                       "--max-queue bounds", s.waiting),
                  "kv_blocks_in_use": ("KV-cache blocks holding tokens", s.kv_blocks_used),
                  "kv_blocks_reserved": ("KV-cache blocks reserved for admitted requests' "
                                         "future tokens", s.kv_blocks_reserved),
                  "kv_blocks_total": ("KV-cache blocks in the pool", s.kv_blocks_total),
                  "expert_slots_resident": ("routed experts resident in the fast tier",
                                            s.expert_slots_resident),
                  "expert_slots_total": ("fast-tier expert slots (capacity x routed layers)",
                                         s.expert_slots_total)}
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(f"readmoe_{name}", doc, value=value)
        counters = {"expert_cache_hits": ("expert accesses served from the fast tier",
                                          s.expert_hits),
                    "expert_cache_misses": ("expert accesses that loaded from the slow tier",
                                            s.expert_misses),
                    "expert_bytes_loaded": ("bytes of expert weights copied to the fast tier",
                                            s.expert_bytes_loaded),
                    "engine_steps": ("engine steps run", s.steps)}
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(f"readmoe_{name}", doc, value=value)


class ServerMetrics:
    def __init__(self, state: Callable[[], EngineState]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("readmoe_time_to_first_token_seconds",
                              "submission to first token", buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("readmoe_inter_token_latency_seconds",
                             "gap between consecutive tokens of a request",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("readmoe_e2e_request_latency_seconds",
                             "submission to last token", buckets=LATENCY_BUCKETS, registry=r)
        self.generated = Counter("readmoe_generation_tokens", "tokens generated", registry=r)
        self.prompt = Counter("readmoe_prompt_tokens", "prompt tokens of finished requests",
                              registry=r)
        self.finished = Counter("readmoe_requests_finished", "requests ended, by reason",
                                ["reason"], registry=r)
        self.rejected = Counter("readmoe_requests_rejected", "requests answered with an "
                                "error status, by status", ["status"], registry=r)
        for reason in sorted(set(FINISH_REASONS.values())):
            self.finished.labels(reason)
        r.register(_EngineCollector(state))

    def observe(self, submitted: float, last: float | None, now: float,
                output: RequestOutput, prompt_len: int) -> None:
        """One token of a request left a step at ``now`` (``last``: its previous token)."""
        self.generated.inc(len(output.new_token_ids))
        if last is None:
            self.ttft.observe(now - submitted)
        else:
            self.itl.observe(now - last)
        if output.finished:
            self.e2e.observe(now - submitted)
            self.prompt.inc(prompt_len)
            self.finished.labels(FINISH_REASONS.get(output.finish_reason, "stop")).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
