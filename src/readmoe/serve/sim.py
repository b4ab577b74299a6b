"""A discrete-event simulator of the server: the real scheduler, cache and planner, a modelled
clock.

Why: to compare schedulers, cache policies, capacities and prefetching on long workloads in
seconds, without a model. It drives the very objects the engine uses (``RequestQueue``, a
registered ``Scheduler`` told what is resident, an ``ExpertPlanner`` over an ``ExpertCache``
with a registered policy, ``BlockAllocator`` for KV admission); only the clock is modelled
(``cost.CostModel`` laid out by ``timeline.run_step``).

Each request's whole expert sequence (prompt, then outputs) is drawn up front from a routing
source, and revealed as the chosen router would: with the ``pre-gating`` router, the prompt's
experts at admission and each output token's right after the step that sampled it (so the
scheduler and Belady see exactly what a real ReadME server would); with a ``layer-wise``
router (the baseline: the same experts, routed inside the backbone), nothing before the layer
runs: the scheduler sees ``UNKNOWN_EXPERT``, each layer is planned as it runs with no future
(Belady acts as LRU), and prefetching is impossible. ``future="oracle"`` instead shows Belady
every request's whole routing (not realisable).

One step, as the engine's: admit arrived requests, in arrival order, while the KV cache can
reserve their largest footprint (the first that does not fit blocks the rest); schedule; plan;
time the plan; the outputs appear at the step's end. When nothing is pending the clock jumps to
the next arrival. Everything is seeded, so a run repeats exactly.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from readmoe.errors import ReadmoeError
from readmoe.serve.cost import PROFILES, CostModel
from readmoe.serve.experts import (
    CacheStats,
    CoDesign,
    ExpertCache,
    ExpertPlanner,
    StepPlan,
    make_policy,
)
from readmoe.serve.experts.stream import StreamPlanner, split_budget
from readmoe.serve.kv_blocks import BlockAllocator
from readmoe.serve.queue import RequestQueue
from readmoe.serve.routing_sources import RoutingSource
from readmoe.serve.schedulers import make_scheduler
from readmoe.serve.timeline import StreamClock, run_step
from readmoe.serve.types import UNKNOWN_EXPERT, Budget, Request, StepReport
from readmoe.serve.workload import RequestSpec

ROUTERS = ("pre-gating", "layer-wise")
FUTURES = ("known", "oracle")


@dataclass(frozen=True)
class SimConfig:
    """One simulated server, by registry names (so a result can record what produced it).

    ``kv_blocks`` x ``block_size`` tokens of KV cache bound admission as in the engine.
    ``stream_budget`` (bytes) simulates the dense baseline instead (``experts/stream.py``): a
    one-expert model whose FFNs stream through that budget; ``policy`` and ``capacity`` are
    then unused.
    """

    scheduler: str = "expert-aware"
    scheduler_options: Mapping[str, float] = field(default_factory=dict)
    policy: str = "belady"
    capacity: int = 4
    budget: Budget = Budget(max_tokens=256, max_seqs=64)
    cost: CostModel = PROFILES["a100-llama2-7b"]
    prefetch: bool = True
    codesign: CoDesign = CoDesign()
    router: str = "pre-gating"
    future: str = "known"
    kv_blocks: int = 1 << 16
    block_size: int = 16
    stream_budget: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.router not in ROUTERS:
            raise ReadmoeError(f"unknown router {self.router!r}; choose one of {ROUTERS}")
        if self.future not in FUTURES:
            raise ReadmoeError(f"unknown future {self.future!r}; choose one of {FUTURES}")
        if self.router == "layer-wise" and self.future == "oracle":
            raise ReadmoeError("the oracle future reads pre-computed routing; a layer-wise "
                               "router has none")
        if self.router == "layer-wise" and (self.prefetch or self.codesign.prefetch_rate):
            raise ReadmoeError("a layer-wise router knows no expert before its layer runs, so it "
                               "cannot prefetch: set prefetch=False")
        if self.codesign.prefetch_rate and not self.prefetch:
            raise ReadmoeError("loading the next step's experts ahead needs prefetch=True")


@dataclass
class SimResult:
    """The finished requests, the steps, the cache counters and every (layer, experts) access
    in time order (for ``optimum.bounds``)."""

    requests: list[Request]
    steps: list[StepReport]
    cache: CacheStats
    accesses: list[tuple[int, tuple[int, ...]]]


def _routed_layers(cost: CostModel) -> list[int]:
    return [layer for layer in range(cost.num_layers) if cost.expert_bytes[layer]]


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
    routed = _routed_layers(cost)
    planner: ExpertPlanner | StreamPlanner = ExpertPlanner(cache, layers, routed, config.codesign)
    if config.stream_budget is not None:
        resident = split_budget(len(routed), cost.expert_bytes[routed[0]], config.stream_budget)
        planner = StreamPlanner(layers, routed, resident, cost.expert_bytes)
    blind = config.router == "layer-wise"
    rng = random.Random(config.seed)
    arrivals = sorted(specs, key=lambda s: s.arrival_time)
    truth = {s.request_id: routing.extend(s.prompt.experts or (),
                                          s.prompt.length + s.max_tokens - 1, rng)
             for s in arrivals}
    if len(truth) != len(arrivals):
        raise ReadmoeError("request ids in a workload must be unique")
    kv = BlockAllocator(config.kv_blocks, config.block_size)
    for spec in arrivals:
        if kv.blocks_for(spec.prompt.length + spec.max_tokens - 1) > kv.num_blocks:
            raise ReadmoeError(f"request {spec.request_id} needs more KV blocks than the "
                               f"simulated cache holds ({kv.num_blocks})")

    queue, steps, accesses = RequestQueue(), [], []
    clock = StreamClock()
    now, arrived, admitted = 0.0, 0, 0
    while admitted < len(arrivals) or queue.waiting or queue.running:
        while arrived < len(arrivals) and arrivals[arrived].arrival_time <= now:
            arrived += 1
        while admitted < arrived:
            spec = arrivals[admitted]
            footprint = spec.prompt.length + spec.max_tokens - 1
            if not kv.can_admit(footprint):
                break
            kv.admit(spec.request_id, footprint)
            prompt = truth[spec.request_id][:spec.prompt.length]
            queue.add(Request(spec.request_id, spec.arrival_time,
                              [UNKNOWN_EXPERT] * len(prompt) if blind else prompt,
                              spec.max_tokens))
            admitted += 1
        if not queue.pending():
            if arrived == len(arrivals):
                raise ReadmoeError("requests wait for KV room that no running request frees")
            now = max(now, arrivals[arrived].arrival_time)
            continue
        step = len(steps)
        batch = queue.schedule(scheduler, budget, planner.view())
        if not batch.chunks:
            raise ReadmoeError(f"scheduler {config.scheduler!r} scheduled nothing while "
                               f"{len(queue.pending())} requests wait")
        tokens = [e for chunk in batch.chunks
                  for e in truth[chunk.request_id][chunk.start:chunk.start + chunk.num_tokens]]
        if blind:
            plan = StepPlan(step)
            layer_plans = {layer: planner.plan_layer(step, layer, _layer_needs(
                batch, per_layer, truth, layer, layers)) for layer in routed}
        else:
            plan = planner.plan(step, batch, [*queue.running, *queue.waiting],
                                budget.max_tokens, truth if config.future == "oracle" else None)
            layer_plans = dict(plan.layers)
        accesses.extend((layer, tuple(sorted(p.order))) for layer, p in layer_plans.items())
        end, load, stall = run_step(clock, cost, plan, layer_plans, now, batch.num_tokens,
                                    config.prefetch)
        sampled = {}
        for chunk in batch.chunks:
            position = chunk.start + chunk.num_tokens
            if chunk.samples and position < len(truth[chunk.request_id]):
                sampled[chunk.request_id] = (UNKNOWN_EXPERT if blind
                                             else truth[chunk.request_id][position])
        for request in queue.complete(batch, sampled, end):
            kv.free(request.request_id)
        distinct = (sum(len(p.order) for p in layer_plans.values()) / len(layer_plans)
                    if layer_plans else len(set(tokens)))
        steps.append(StepReport(step=step, start_time=now, end_time=end,
                                num_tokens=batch.num_tokens, num_seqs=batch.num_seqs,
                                distinct_experts=distinct, load_s=load, stall_s=stall,
                                experts=tuple(sorted(set(tokens))), token_experts=tuple(tokens)))
        now = end
    stats = planner.stats if isinstance(planner, StreamPlanner) else cache.stats
    stats.load_s = sum(s.load_s for s in steps)
    stats.stall_s = sum(s.stall_s for s in steps)
    return SimResult(requests=queue.finished, steps=steps, cache=stats, accesses=accesses)


def _layer_needs(batch, per_layer: Mapping[str, Sequence[Sequence[int]]] | None,
                 truth: Mapping[str, Sequence[int]], layer: int, layers: int) -> list[int]:
    """The experts ``layer`` needs in ``batch``: each layer's own choices when given."""
    if per_layer is None:
        return sorted({e for c in batch.chunks
                       for e in truth[c.request_id][c.start:c.start + c.num_tokens]})
    return sorted({int(row[layer * len(row) // layers]) for c in batch.chunks
                   for row in per_layer[c.request_id][c.start:c.start + c.num_tokens]})
