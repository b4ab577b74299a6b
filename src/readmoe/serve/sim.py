"""A discrete-event simulator of the server: the real scheduler and cache, a modelled clock.

Why: to compare schedulers, cache policies, capacities and prefetching on long workloads in
seconds, without a model. It drives the very objects the engine uses (``RequestQueue``, a
registered ``Scheduler``, an ``ExpertCache`` with a registered policy); only the clock is
modelled (``cost.CostModel``).

Each request's whole expert sequence (prompt, then outputs) is drawn up front from a routing
source, and revealed as the chosen router would: with the ``pre-gating`` router, the prompt's
experts at admission and each output token's right after the step that sampled it (so the
scheduler and Belady see exactly what a real ReadME server would); with a ``layer-wise``
router (the baseline: the same experts, routed inside the backbone), nothing before the layer
runs: the scheduler sees ``UNKNOWN_EXPERT``, Belady sees no future (so it acts as LRU), and
prefetching is impossible. ``future="oracle"`` instead shows Belady every request's whole
routing (not realisable: an upper bound on what a known future is worth).

One step: admit the requests that have arrived; schedule; for each layer in order, access its
experts in the cache at time ``step * num_layers + layer``; lay out loads and compute
(``cost.layer_timeline``); the outputs appear at the step's end. When nothing is pending the
clock jumps to the next arrival. Everything is seeded, so a run repeats exactly.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from readmoe.errors import ReadmoeError
from readmoe.serve.cost import PROFILES, CostModel, layer_timeline
from readmoe.serve.experts import (
    CacheStats,
    ExpertCache,
    ExpertKey,
    FutureUses,
    make_policy,
    step_needs,
)
from readmoe.serve.queue import RequestQueue
from readmoe.serve.routing import RoutingSource
from readmoe.serve.schedulers import make_scheduler
from readmoe.serve.types import UNKNOWN_EXPERT, Budget, Request, StepReport
from readmoe.serve.workload import RequestSpec

ROUTERS = ("pre-gating", "layer-wise")
FUTURES = ("known", "oracle")


@dataclass(frozen=True)
class SimConfig:
    """One simulated server, by registry names (so a result can record what produced it)."""

    scheduler: str = "expert-aware"
    scheduler_options: Mapping[str, int] = field(default_factory=dict)
    policy: str = "belady"
    capacity: int = 4
    budget: Budget = Budget(max_tokens=256, max_seqs=64)
    cost: CostModel = PROFILES["a100-llama2-7b"]
    prefetch: bool = True
    router: str = "pre-gating"
    future: str = "known"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.router not in ROUTERS:
            raise ReadmoeError(f"unknown router {self.router!r}; choose one of {ROUTERS}")
        if self.future not in FUTURES:
            raise ReadmoeError(f"unknown future {self.future!r}; choose one of {FUTURES}")
        if self.router == "layer-wise" and self.future == "oracle":
            raise ReadmoeError("the oracle future reads pre-computed routing; a layer-wise "
                               "router has none")
        if self.router == "layer-wise" and self.prefetch:
            raise ReadmoeError("a layer-wise router knows no expert before its layer runs, so it "
                               "cannot prefetch: set prefetch=False")


@dataclass
class SimResult:
    requests: list[Request]
    steps: list[StepReport]
    cache: CacheStats


def _run_layers(cache: ExpertCache, config: SimConfig, step: int,
                needs: Sequence[Sequence[ExpertKey]], num_tokens: int,
                future: FutureUses) -> tuple[float, float, float]:
    """Access each layer's experts in order; return the layers' (duration, load, stall)."""
    cost, layers = config.cost, config.cost.num_layers
    ahead, serial, compute = [], [], []
    for layer, keys in enumerate(needs):
        compute.append(cost.layer_compute(num_tokens, len(keys)))
        if not cost.expert_bytes[layer]:  # a layer without routed experts (e.g. kept dense)
            keys = []
        missed = len(cache.access(keys, step * layers + layer, future)) if keys else 0
        early = min(missed, config.capacity - (len(keys) - missed))  # into slots not in use
        ahead.append(cost.load_time(layer, early))
        serial.append(cost.load_time(layer, missed - early))
    duration, stall = layer_timeline(compute, ahead, serial, config.prefetch)
    return duration, sum(ahead) + sum(serial), stall


def simulate(specs: Sequence[RequestSpec], routing: RoutingSource, config: SimConfig,
             per_layer: Mapping[str, Sequence[Sequence[int]]] | None = None) -> SimResult:
    """Serve ``specs`` to completion; outputs not fixed by the specs come from ``routing``.

    ``per_layer`` (request id -> [token][layer] expert ids) gives each layer its own choices,
    as a layer-wise router makes them; the cache then sees those, while the scheduler still
    sees ``routing``'s one expert per token (unknown, with the layer-wise router). Rows with
    another number of layers than the cost model are spread evenly over its layers (layer
    ``l`` reads column ``l * len(row) // num_layers``), to project a smaller model's routing."""
    cost, layers, budget = config.cost, config.cost.num_layers, config.budget
    scheduler = make_scheduler(config.scheduler, **config.scheduler_options)
    cache = ExpertCache(config.capacity, cost.expert_bytes, make_policy(config.policy, config.seed))
    blind = config.router == "layer-wise"
    rng = random.Random(config.seed)
    arrivals = sorted(specs, key=lambda s: s.arrival_time)
    truth = {s.request_id: routing.extend(s.prompt.experts or (),
                                          s.prompt.length + s.max_tokens - 1, rng)
             for s in arrivals}
    if len(truth) != len(arrivals):
        raise ReadmoeError("request ids in a workload must be unique")

    queue, steps = RequestQueue(), []
    now, admitted = 0.0, 0
    while admitted < len(arrivals) or queue.waiting or queue.running:
        while admitted < len(arrivals) and arrivals[admitted].arrival_time <= now:
            spec = arrivals[admitted]
            prompt = truth[spec.request_id][:spec.prompt.length]
            queue.add(Request(spec.request_id, spec.arrival_time,
                              [UNKNOWN_EXPERT] * len(prompt) if blind else prompt,
                              spec.max_tokens))
            admitted += 1
        if not queue.pending():
            now = max(now, arrivals[admitted].arrival_time)
            continue
        step = len(steps)
        batch = queue.schedule(scheduler, budget)
        if not batch.chunks:
            raise ReadmoeError(f"scheduler {config.scheduler!r} scheduled nothing while "
                               f"{len(queue.pending())} requests wait")
        experts = {e for chunk in batch.chunks
                   for e in truth[chunk.request_id][chunk.start:chunk.start + chunk.num_tokens]}
        if per_layer is None:
            needs = step_needs(experts, layers)
        else:
            needs = [sorted({(layer, int(row[layer * len(row) // layers]))
                             for c in batch.chunks
                             for row in per_layer[c.request_id][c.start:c.start + c.num_tokens]})
                     for layer in range(layers)]
            experts = {e for keys in needs for _, e in keys}  # all layers' (for the record)
        future = FutureUses() if blind else FutureUses.from_schedule(
            step, layers, batch, [*queue.running, *queue.waiting], budget.max_tokens,
            truth if config.future == "oracle" else None)
        duration, load, stall = _run_layers(cache, config, step, needs, batch.num_tokens,
                                            future)
        end = now + cost.step_overhead_s + duration
        sampled = {}
        for chunk in batch.chunks:
            position = chunk.start + chunk.num_tokens
            if chunk.samples and position < len(truth[chunk.request_id]):
                sampled[chunk.request_id] = (UNKNOWN_EXPERT if blind
                                             else truth[chunk.request_id][position])
        queue.complete(batch, sampled, end)
        steps.append(StepReport(step=step, start_time=now, end_time=end,
                                num_tokens=batch.num_tokens, num_seqs=batch.num_seqs,
                                distinct_experts=sum(map(len, needs)) / layers, load_s=load,
                                stall_s=stall))
        now = end
    return SimResult(requests=queue.finished, steps=steps, cache=cache.stats)
