"""The paper's serving experiments (Section 6) on the simulator, driven by real routing.

Why here: the simulator runs the very scheduler, cache and policy objects the engine does, with
a stated cost profile (a projection of an A100 serving Llama-2-7B-sized experts, not a
measurement), so what these numbers compare is the routing: the trained pre-gating router's
choices on real text (``traces``), or, when no model is given, a labelled Markov stand-in with
the paper's measured locality. Experiments:

(a) per scheduler: distinct experts per step, normalized latency mean/p95, at two rates;
(b) hit ratio of each eviction policy at capacities 2..5 (next to the paper's Table 4);
(c) normalized latency with prefetch vs on-demand loading at capacities 2..5;
(d) the layer-wise-router baseline (blind scheduling, no future for Belady, no prefetch).

``engine_cross_check`` serves a few of the trace's prompts on the real engine with experts
offloaded to an ``ExpertStore`` (model folder, emulated link) and replays the engine's routing
in the simulator with a cost model fitted to this machine: hit counts must agree exactly,
latency within ``LATENCY_TOLERANCE``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from readmoe.serve.cost import get_profile
from readmoe.serve.experts.store import ExpertStore
from readmoe.serve.metrics import aggregate, request_metrics
from readmoe.serve.routing_sources import MarkovRouting, RoutingSource
from readmoe.serve.sim import SimConfig, simulate
from readmoe.serve.traces import RoutedTrace
from readmoe.serve.types import Budget
from readmoe.serve.workload import Prompt, RequestSpec, routed_prompts, synthetic_workload

PAPER_TABLE4 = {2: {"random": 0.3419, "lru": 0.3390, "belady": 0.4416},
                3: {"random": 0.5014, "lru": 0.5242, "belady": 0.6182},
                4: {"random": 0.6752, "lru": 0.6695, "belady": 0.7721},
                5: {"random": 0.8291, "lru": 0.8348, "belady": 0.8803}}
PAPER_SCHEDULERS = {"distinct_experts": {"decode-first": 5.08, "prefill-first": 5.21,
                                         "expert-aware": 3.51},
                    "mean_latency_change": "-5.0% to -6.1%",
                    "p95_latency_change": "-9.5% to -10.0%"}
PAPER_PREFETCH = "up to 30% lower latency than on-demand loading at capacities 2..5"
ORACLE_BELADY = "belady (oracle future)"
"""Belady told every request's whole routing: not realisable online, an upper bound."""
CROSS_CHECK_BUDGET = Budget(max_tokens=64, max_seqs=8)
LATENCY_TOLERANCE = 0.25
"""How far the simulator's latency may stray from the engine's in the cross-check: a linear
cost model fitted on a shared, noisy CPU (hit counts must agree exactly)."""
MIXTRAL_REUSE = 850 / 4096
"""Mixtral's measured share of tokens reusing the previous token's expert (the paper)."""


@dataclass(frozen=True)
class RoutingInput:
    """Where requests and their experts come from, with a label that says so."""

    label: str
    num_experts: int
    specs: Callable[[float], list[RequestSpec]]
    routing: Callable[[], RoutingSource]
    per_layer: dict[str, Sequence[Sequence[int]]] | None = None  # layer-wise choices


def trace_input(trace: RoutedTrace, label: str, layer: int | None = None,
                seed: int = 0) -> RoutingInput:
    """Requests and routing of a trace; ``layer`` picks one layer's choices of a layer-wise
    trace as each token's expert, while the cache sees every layer's own (``per_layer``)."""
    per_layer = ({r.request_id: r.layers for r in trace.requests}
                 if layer is not None else None)
    return RoutingInput(label, trace.num_experts,
                        lambda rate: trace.specs(rate, seed=seed, layer=layer),
                        lambda: trace.routing(layer), per_layer)


def markov_input(num_experts: int, reuse: float, num_requests: int, label: str,
                 seed: int = 0) -> RoutingInput:
    routing = MarkovRouting(num_experts, reuse)
    return RoutingInput(label, num_experts,
                        lambda rate: synthetic_workload(num_requests, rate, routed_prompts(routing),
                                                        seed=seed),
                        lambda: routing)


@dataclass(frozen=True)
class SuiteConfig:
    rates: tuple[float, float] = (0.5, 2.0)
    capacities: tuple[int, ...] = (2, 3, 4, 5)
    schedulers: tuple[str, ...] = ("fcfs", "decode-first", "prefill-first", "expert-aware")
    policies: tuple[str, ...] = ("random", "lru", "lfu", "belady")
    scheduler_capacity: int = 4
    profile: str = "a100-llama2-7b"
    budget: Budget = field(default_factory=lambda: Budget(max_tokens=256, max_seqs=64))
    seed: int = 0


def _simulate(source: RoutingInput, rate: float, config: SuiteConfig, **options) -> dict:
    sim = SimConfig(**{"budget": config.budget, "cost": get_profile(config.profile),
                       "seed": config.seed, **options})
    result = simulate(source.specs(rate), source.routing(), sim, source.per_layer)
    metrics = aggregate(result.requests, result.steps, result.cache)
    return {"distinct_experts_per_step": metrics["distinct_experts_per_step"],
            "normalized_latency_s": metrics["normalized_latency_s"],
            "hit_ratio": metrics["cache"]["hit_ratio"],
            "load_hidden_fraction": metrics["load_hidden_fraction"],
            "normalized": [request_metrics(r).normalized for r in result.requests]}


def run_suite(pregating: RoutingInput, layerwise: RoutingInput,
              config: SuiteConfig = SuiteConfig()) -> dict:
    """Experiments (a)-(d) (module docstring); latencies per request kept for the CDF plot."""
    high = config.rates[-1]
    schedulers = {str(rate): {name: _simulate(pregating, rate, config, scheduler=name,
                                              capacity=config.scheduler_capacity)
                              for name in config.schedulers}
                  for rate in config.rates}
    if "expert-aware" in config.schedulers:  # our cap: a step's experts fit the cache
        capped = f"expert-aware, max {config.scheduler_capacity} experts"
        for rate in config.rates:
            schedulers[str(rate)][capped] = _simulate(
                pregating, rate, config, scheduler="expert-aware",
                scheduler_options={"max_experts": config.scheduler_capacity},
                capacity=config.scheduler_capacity)
    cache = {policy: {str(c): _simulate(pregating, high, config, policy=policy, capacity=c)
                      for c in config.capacities} for policy in config.policies}
    if "belady" in config.policies:  # the paper's Belady reads pre-computed routing
        cache[ORACLE_BELADY] = {str(c): _simulate(pregating, high, config, policy="belady",
                                                  capacity=c, future="oracle")
                                for c in config.capacities}
    # the same with each step capped to the capacity's experts (expert-aware, max_experts)
    capped_cache = {policy: {str(c): _simulate(pregating, high, config, policy=policy,
                                               capacity=c, scheduler_options={"max_experts": c})
                             for c in config.capacities} for policy in config.policies}
    on_demand = {str(c): _simulate(pregating, high, config, capacity=c, prefetch=False)
                 for c in config.capacities}
    prefetch = {}
    for c in map(str, config.capacities):
        ahead = cache["belady"][c]["normalized_latency_s"]["mean"]
        slow = on_demand[c]["normalized_latency_s"]["mean"]
        prefetch[c] = {"prefetch_mean_s": ahead, "on_demand_mean_s": slow,
                       "reduction": 1.0 - ahead / slow,
                       "hidden_fraction": cache["belady"][c]["load_hidden_fraction"]}
    layer_wise = {policy: {str(c): _simulate(layerwise, high, config, policy=policy, capacity=c,
                                             router="layer-wise", prefetch=False)
                           for c in config.capacities} for policy in config.policies}
    return {"pregating_source": pregating.label, "layerwise_source": layerwise.label,
            "num_experts": pregating.num_experts, "profile": config.profile,
            "config": {**asdict(config), "budget": asdict(config.budget)},
            "schedulers": schedulers, "cache": cache, "capped_cache": capped_cache,
            "on_demand": on_demand,
            "prefetch": prefetch, "layerwise": layer_wise}


def engine_cross_check(model_dir: str | Path, trace: RoutedTrace, *, requests: int = 12,
                       max_prompt: int = 48, max_tokens: int = 16, capacity: int = 2,
                       policy: str = "belady", bandwidth: float = 2e9,
                       budget: Budget = CROSS_CHECK_BUDGET, model=None, tokenizer=None) -> dict:
    """The real engine against the simulator (``crosscheck.engine_vs_simulator``) on the
    trace's first ``requests`` prompts (shortened to fit a CPU), with routed experts read
    from the model folder over an emulated link of ``bandwidth`` bytes/s; on demand and with
    prefetch. ``model`` and ``tokenizer`` default to the folder's."""
    from readmoe.models import load_model, load_tokenizer
    from readmoe.serve.crosscheck import engine_vs_simulator

    model = model if model is not None else load_model(str(model_dir))
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(str(model_dir))
    specs = []
    for r in trace.requests[:requests]:
        length = min(r.prompt_len, max_prompt)
        specs.append(RequestSpec(r.request_id, 0.0, Prompt(length, tokens=r.tokens[:length]),
                                 min(r.max_tokens, max_tokens)))
    return {("prefetch" if prefetch else "on_demand"): engine_vs_simulator(
        model, tokenizer, specs, lambda: ExpertStore(model_dir, capacity=capacity, policy=policy,
                                                     tier="file", bandwidth=bandwidth),
        scheduler="expert-aware", budget=budget, prefetch=prefetch)
        for prefetch in (False, True)}
