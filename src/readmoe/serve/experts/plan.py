"""The step plan: what every routed layer of a step computes, in what order, and what to load.

Why one planner: the engine and the simulator must take the very same decisions (hits, victims,
slots, prefetches) for their results to be comparable, so both ask an ``ExpertPlanner`` and
differ only in who executes the plan (the store's copy engine, or the simulator's clock).

A step's plan, made once its batch is scheduled (the pre-gating router has named every token's
expert, so every layer's needs are known before the backbone runs):

1. The future Belady reads (``FutureUses.from_schedule``): this step's batch, the known queue,
   and, with a predictor, each sampling request's predicted next expert at the next step.
2. Each routed layer's access (``ExpertCache.plan_access``): hits first, loads into free slots
   or over the policy's victim, the soonest-needed experts left resident.
3. With ``CoDesign.prefetch_rate`` r > 0, loads for the *next* step (``speculate``): the
   predicted demand per expert (every unfinished request's next expert, known or predicted)
   ranks the missing experts; they are loaded into every routed layer, each over the resident
   expert with the least predicted demand (ties: Belady's furthest next use, then least
   recently used), and only where that demand is lower than the incoming expert's. Pace: a
   credit of r experts accrues per step (r is what the copy stream can load in one step's
   compute; it may be below 1), and each expert loaded ahead spends one, so prefetches never
   outrun the copy stream; unspent credit is kept up to max(1, r). A
   victim still used in this step is overwritten after its compute in that layer. These loads
   queue behind the step's own, so they fill the copy stream's idle time; the next step finds
   the expert resident, and the cache-aware scheduler (``schedulers/cache_aware.py``) prefers
   it. Fallback: with no prediction for a request, only its known tokens count.

A layer-wise router names experts only inside each layer, so its layers are planned one by one
as they run (``plan_layer``), with no future and no prefetch.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from readmoe.errors import ReadmoeError
from readmoe.serve.experts.cache import ExpertCache, LayerPlan, Load
from readmoe.serve.experts.future import FutureUses, access_time
from readmoe.serve.experts.predict import NextExpertPredictor, make_predictor
from readmoe.serve.types import UNKNOWN_EXPERT, Batch, CacheView, Request


@dataclass(frozen=True)
class CoDesign:
    """What the planner does with the router's foresight beyond the current step.

    ``predictor``: the next-expert rule for sampling requests (``predict.py``), or None for no
    predicted future; ``prefetch_rate``: experts per step loaded ahead for the next step, on
    average (fractions allowed; 0: none). ``readme-lru``-style serving uses neither.
    """

    predictor: str | None = None
    prefetch_rate: float = 0.0

    def __post_init__(self) -> None:
        if self.prefetch_rate < 0:
            raise ReadmoeError(f"prefetch_rate must be >= 0, got {self.prefetch_rate}")
        if self.prefetch_rate and self.predictor is None:
            raise ReadmoeError("prefetching for the next step needs a predictor of the next "
                               "expert (e.g. predictor='last')")
        if self.predictor is not None:
            make_predictor(self.predictor)


@dataclass(frozen=True)
class StepPlan:
    """One step's accesses: ``layers`` maps each routed layer planned ahead to its plan;
    ``speculative`` are the loads for the next step, issued after the step's own."""

    step: int
    layers: Mapping[int, LayerPlan] = field(default_factory=dict)
    speculative: tuple[Load, ...] = ()


class ExpertPlanner:
    """Plans steps on ``cache`` for a model of ``num_layers`` layers whose ``routed_layers``
    hold routed experts."""

    def __init__(self, cache: ExpertCache, num_layers: int, routed_layers: Sequence[int],
                 codesign: CoDesign | None = None) -> None:
        codesign = codesign or CoDesign()
        self.cache = cache
        self.num_layers = num_layers
        self.routed_layers = list(routed_layers)
        self.codesign = codesign
        self.predictor: NextExpertPredictor | None = (
            make_predictor(codesign.predictor) if codesign.predictor else None)
        self._credit = 0.0  # experts the prefetcher may load ahead now (module docstring, 3)

    def view(self) -> CacheView:
        """What the scheduler may know: the experts resident in every routed layer."""
        return CacheView(self.cache.resident_everywhere(self.routed_layers), self.cache.capacity)

    def predictions(self, queued: Iterable[Request]) -> dict[str, int]:
        """The predicted next expert of each request whose next token is not known yet (it
        samples in this step), unless that sample is its last."""
        if self.predictor is None:
            return {}
        guesses = {r.request_id: self.predictor.predict(r) for r in queued
                   if not r.pending_experts and r.num_output + 1 < r.max_tokens}
        return {rid: e for rid, e in guesses.items() if e is not None}

    def plan(self, step: int, batch: Batch, queued: Sequence[Request], tokens_per_step: int,
             lookahead: Mapping[str, Sequence[int]] | None = None) -> StepPlan:
        """Plan ``step`` (its batch already marked computed in ``queued``, the unfinished
        requests in expected service order). ``lookahead`` gives Belady whole routings (the
        simulator's oracle future)."""
        predicted = self.predictions(queued)
        future = FutureUses.from_schedule(step, self.num_layers, batch, queued, tokens_per_step,
                                          lookahead, predicted)
        layers = {layer: self.cache.plan_access(
            layer, batch.experts, access_time(step, layer, self.num_layers), future)
            for layer in self.routed_layers}
        speculative = ()
        if self.codesign.prefetch_rate and self.routed_layers:
            rate = self.codesign.prefetch_rate
            self._credit = min(self._credit + rate, max(1.0, rate))
            speculative = self.speculate(step, layers, queued, predicted, future,
                                         int(self._credit))
            self._credit -= len({load.expert for load in speculative})
        return StepPlan(step, layers, speculative)

    def plan_layer(self, step: int, layer: int, experts: Iterable[int]) -> LayerPlan:
        """One layer planned as it runs (a layer-wise router's experts), with no future."""
        return self.cache.plan_access(layer, experts, access_time(step, layer, self.num_layers),
                                      FutureUses())

    def speculate(self, step: int, layers: Mapping[int, LayerPlan], queued: Sequence[Request],
                  predicted: Mapping[str, int], future: FutureUses, count: int
                  ) -> tuple[Load, ...]:
        """Loads of up to ``count`` experts for the next step from the predicted demand
        (module docstring, 3)."""
        demand = Counter()
        for request in queued:
            expert = request.next_expert
            expert = predicted.get(request.request_id) if expert is None else expert
            if expert is not None and expert != UNKNOWN_EXPERT:
                demand[expert] += 1
        cache, routed = self.cache, self.routed_layers
        time = access_time(step, routed[-1], self.num_layers)
        resident = set(cache.resident_everywhere(routed))
        wanted = sorted((e for e in demand if e not in resident), key=lambda e: (-demand[e], e))
        last_use = cache.policy.last_use
        loads: list[Load] = []
        for expert in wanted[:count]:
            victim = None
            if any(not cache.has_free_slot(layer) and expert not in cache.resident(layer)
                   for layer in routed):
                if not resident:
                    break
                victim = min(resident, key=lambda v: (
                    demand[v], -future.next_use((routed[0], v), time),
                    last_use.get((routed[0], v), 0)))
                if demand[victim] >= demand[expert]:
                    break
                resident.discard(victim)
            for layer in routed:
                if expert in cache.resident(layer):
                    continue
                if cache.has_free_slot(layer):
                    loads.append(cache.install(layer, expert, None, time, future))
                    continue
                order = layers[layer].order
                after = order.index(victim) if victim in order else None
                loads.append(cache.install(layer, expert, victim, time, future, after))
        return tuple(loads)
