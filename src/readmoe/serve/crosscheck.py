"""The engine against the simulator on one workload: same scheduler and cache, real vs modelled
clock.

Why: the simulator projects the engine to other machines and scales, so it must first model
this one. Protocol (``engine_vs_simulator``):

1. Every request arrives at time 0 and decodes exactly its ``max_tokens`` greedily, so both
   sides admit everything at the first step and their schedules can be compared step by step.
2. Resident runs (every routed expert in memory) measure step times; ``fit_cost_model`` turns
   them into the simulator's compute parameters. One run under the checked scheduler alone
   makes a badly conditioned fit (its steps' token and expert counts move together: a
   cache-aware run has few of both, FCFS many of both, and the fit's extrapolation was off by
   -11% to +23% between identical runs), so the same requests are also run under FCFS and
   under expert-aware batching capped at one expert per step, and the fit pools all three.
3. An offloaded run (``ExpertStore``: capacity, policy, prefetch) records each request's real
   expert sequence and the store's counters; its copy bandwidth (bytes moved over seconds
   loading) is the simulator's load bandwidth.
4. The simulator replays the recorded sequences (``ReplayRouting``) with that cost model.
5. Then once more with the offloaded path's own host work per step added as step overhead:
   the offloaded run's mean stall-free step time (``end - start - stall_s``) less what the
   resident fit predicts for the same steps. It is the planner (Belady, predictor, speculation)
   and the store's slot bookkeeping, which a resident run never does; measured on the
   offloaded run, it leaves the simulator to predict only what it models (the copy stream's
   overlap with compute, and the stalls). Both errors are reported, labelled.

Hit and miss counts and every step's expert set must agree exactly (the same scheduler,
planner, cache and policy objects see the same requests, KV admission and known or predicted
future); latency agrees only up to the cost model's error (a linear fit of a noisy machine),
which the result reports as relative differences for the caller to hold against its tolerance.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch

from readmoe.errors import ReadmoeError
from readmoe.serve.cost import CostModel, StepSample, fit_cost_model
from readmoe.serve.engine import DEFAULT_BUDGET, Engine
from readmoe.serve.experts import CoDesign
from readmoe.serve.experts.store import ExpertStore
from readmoe.serve.metrics import aggregate
from readmoe.serve.schedulers import make_scheduler
from readmoe.serve.sim import SimConfig, simulate
from readmoe.serve.traces import ReplayRouting
from readmoe.serve.types import Budget
from readmoe.serve.workload import RequestSpec


def _relative(measured: float | None, modelled: float | None) -> float | None:
    if not measured or modelled is None:
        return None
    return modelled / measured - 1.0


def engine_vs_simulator(model: torch.nn.Module, tokenizer, specs: Sequence[RequestSpec],
                        open_store: Callable[[], ExpertStore], *, scheduler: str = "fcfs",
                        scheduler_options: dict | None = None,
                        budget: Budget = DEFAULT_BUDGET, prefetch: bool = True,
                        codesign: CoDesign | None = None,
                        kv_blocks: int = 512, block_size: int = 16,
                        cost: CostModel | None = None, threads: int | None = None) -> dict:
    """Run ``specs`` (arrivals ignored: all at 0) on the engine, resident then offloaded to
    ``open_store()``, and on the simulator; return both sides' counters and latencies.

    ``cost``: the simulator's compute and copy model; by default fitted to the resident runs and
    the offloaded run's measured copy bandwidth (module docstring); the store path's measured
    host overhead per step is added to it either way. Both runs use ``threads``
    compute threads, by default one less than the CPUs: the copy worker needs a core of its
    own, or it slows the compute it should overlap with.
    """
    if model.config.router_type != "pregating":
        raise ReadmoeError("the cross-check replays pre-gating routing; a layer-wise model "
                           "chooses per layer, which the simulator's trace does not hold")
    specs = [replace(s, arrival_time=0.0) for s in specs]
    threads = threads or max(1, (os.cpu_count() or 2) - 1)
    options = scheduler_options or {}
    codesign = codesign or CoDesign()

    def run(store: ExpertStore | None, name: str = scheduler, kwargs: dict = options) -> Engine:
        engine = Engine(model, tokenizer, make_scheduler(name, **kwargs), budget,
                        kv_blocks, block_size, expert_store=store,
                        prefetch=prefetch and store is not None,
                        codesign=codesign if store is not None else None)
        engine.run_workload(specs)
        return engine

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        resident = [run(None), run(None, "fcfs", {}),
                    run(None, "expert-aware", {"max_experts": 1})]
        with open_store() as store:
            offloaded = run(store)
            stats, expert_bytes = store.stats, store.expert_bytes
            policy, capacity = store.cache.policy.name, store.capacity
    finally:
        torch.set_num_threads(previous)
    if cost is None:
        samples = [StepSample(s.num_tokens, s.distinct_experts, s.end_time - s.start_time)
                   for engine in resident for s in engine.steps]
        bandwidth = stats.bytes_moved / stats.load_s if stats.load_s > 0 else float("inf")
        cost = fit_cost_model(samples, expert_bytes=expert_bytes, load_bandwidth=bandwidth)
    overhead = max(0.0, sum(
        s.end_time - s.start_time - s.stall_s - cost.num_layers * cost.layer_compute(
            s.num_tokens, s.distinct_experts) - cost.step_overhead_s
        for s in offloaded.steps) / len(offloaded.steps))
    with_overhead = replace(cost, step_overhead_s=cost.step_overhead_s + overhead)
    requests = offloaded.queue.finished
    recorded = [(r.prompt_len, r.prompt_experts + r.output_experts)
                for r in sorted(requests, key=lambda r: r.request_id)]
    by_id = {r.request_id: r for r in requests}
    sim_specs = [replace(s, prompt=replace(s.prompt, experts=tuple(
        by_id[s.request_id].prompt_experts))) for s in specs]
    config = SimConfig(scheduler=scheduler, scheduler_options=options, policy=policy,
                       capacity=capacity, budget=budget, cost=with_overhead, prefetch=prefetch,
                       codesign=codesign, kv_blocks=kv_blocks, block_size=block_size)
    simulated = simulate(sim_specs, ReplayRouting(recorded), config)
    resident_only = simulate(sim_specs, ReplayRouting(recorded), replace(config, cost=cost))

    engine_metrics = aggregate(requests, offloaded.steps, stats)
    sim_metrics = aggregate(simulated.requests, simulated.steps, simulated.cache)
    mean_latency = engine_metrics["e2e_s"]["mean"]
    same_schedule = [(s.num_tokens, s.experts) for s in offloaded.steps] == [
        (s.num_tokens, s.experts) for s in simulated.steps]
    makespan = offloaded.steps[-1].end_time - offloaded.steps[0].start_time
    return {
        "requests": len(specs), "scheduler": scheduler, "policy": policy, "capacity": capacity,
        "threads": threads,
        "prefetch": prefetch, "store": store.describe(),
        "cost_model": {k: v for k, v in vars(with_overhead).items() if k != "expert_bytes"},
        "store_overhead_s": overhead,
        "engine": {"makespan_s": makespan, **engine_metrics},
        "simulator": {"makespan_s": simulated.steps[-1].end_time, **sim_metrics},
        "hits_agree": (stats.hits, stats.misses, stats.prefetched) == (
            simulated.cache.hits, simulated.cache.misses, simulated.cache.prefetched),
        "schedules_agree": same_schedule,
        "makespan_error": _relative(makespan, simulated.steps[-1].end_time),
        "mean_latency_error": _relative(mean_latency, sim_metrics["e2e_s"]["mean"]),
        "mean_latency_error_resident_fit_only": _relative(
            mean_latency, aggregate(resident_only.requests, resident_only.steps)["e2e_s"]["mean"]),
    }
