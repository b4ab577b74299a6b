import random
from dataclasses import replace

import pytest

from readmoe.errors import ReadmoeError
from readmoe.serve.cost import PROFILES, CostModel, StepSample, fit_cost_model, get_profile
from readmoe.serve.experts import CoDesign
from readmoe.serve.metrics import aggregate
from readmoe.serve.routing_sources import MarkovRouting
from readmoe.serve.sim import SimConfig, simulate
from readmoe.serve.traces import ReplayRouting
from readmoe.serve.types import Budget
from readmoe.serve.workload import LengthModel, routed_prompts, synthetic_workload

# small and fast: 4 layers, a 1 ms load per expert, compute of the same order
COST = CostModel(num_layers=4, expert_bytes=(1_000_000,) * 4, step_overhead_s=1e-3,
                 layer_fixed_s=4e-4, token_s=1e-5, expert_s=2e-4, load_bandwidth=1e9)
ROUTING = MarkovRouting(8)
SHORT = {"prompt_lengths": LengthModel(12.0, 0.8, 64),
         "output_lengths": LengthModel(16.0, 0.6, 64)}


def _workload(rate, count=40, seed=0):
    return synthetic_workload(count, rate, routed_prompts(ROUTING), seed=seed, **SHORT)


def _config(**overrides):
    base = {"scheduler": "expert-aware", "policy": "belady", "capacity": 3,
            "budget": Budget(32, 16), "cost": COST}
    return SimConfig(**{**base, **overrides})


def test_every_request_finishes_once_with_max_tokens_outputs():
    specs = _workload(50.0)
    for scheduler in ("fcfs", "decode-first", "prefill-first", "expert-aware", "cache-aware"):
        result = simulate(specs, ROUTING, _config(scheduler=scheduler,
                                                  codesign=CoDesign("last", 1)))
        by_id = {r.request_id: r for r in result.requests}
        assert sorted(by_id) == sorted(s.request_id for s in specs)
        for spec in specs:
            request = by_id[spec.request_id]
            assert request.num_output == spec.max_tokens
            assert request.output_times == sorted(request.output_times)
            assert request.output_times[0] > spec.arrival_time


def test_simulation_is_deterministic_for_a_seed():
    specs = _workload(30.0)
    for policy in ("random", "belady"):
        first = simulate(specs, ROUTING, _config(policy=policy, seed=5))
        second = simulate(specs, ROUTING, _config(policy=policy, seed=5))
        assert first.steps == second.steps and first.cache == second.cache
        assert [r.output_times for r in first.requests] == [
            r.output_times for r in second.requests]


def test_prefetch_is_never_slower_than_on_demand():
    specs = _workload(float("inf"))  # all at once: both runs schedule the very same steps
    for capacity in (1, 2, 4):  # 1: accesses beyond capacity wait for compute in both
        runs = [simulate(specs, ROUTING, _config(capacity=capacity, prefetch=prefetch))
                for prefetch in (True, False)]
        prefetched, on_demand = runs
        assert [s.num_tokens for s in prefetched.steps] == [s.num_tokens for s in on_demand.steps]
        for fast, slow in zip(prefetched.steps, on_demand.steps, strict=True):
            assert fast.end_time - fast.start_time <= slow.end_time - slow.start_time + 1e-12
        assert (prefetched.cache.hits, prefetched.cache.misses) == (on_demand.cache.hits,
                                                                   on_demand.cache.misses)
        assert prefetched.cache.stall_s < on_demand.cache.stall_s


def test_layer_wise_router_hides_the_future():
    specs = _workload(40.0)
    blind = {policy: simulate(specs, ROUTING, _config(router="layer-wise", prefetch=False,
                                                      policy=policy))
             for policy in ("belady", "lru")}
    assert blind["belady"].cache == blind["lru"].cache  # no known future: Belady is LRU
    with pytest.raises(ReadmoeError, match="cannot prefetch"):
        SimConfig(router="layer-wise", prefetch=True)
    with pytest.raises(ReadmoeError, match="layer-wise router has none"):
        SimConfig(router="layer-wise", prefetch=False, future="oracle")


def test_belady_gains_from_the_oracle_future():
    # all at once, and every request runs every step: the same steps for every policy, and
    # the oracle's estimate of when each future token runs is exact
    specs = _workload(float("inf"), count=10)
    hits = {(policy, future): simulate(specs, ROUTING, _config(
        policy=policy, future=future, capacity=2, budget=Budget(1024, 64))).cache.hit_ratio
        for policy, future in (("lru", "known"), ("belady", "known"), ("belady", "oracle"))}
    assert hits["belady", "known"] >= hits["lru", "known"]
    assert hits["belady", "oracle"] > hits["lru", "known"] + 0.04, hits


def test_expert_aware_uses_fewer_experts_per_step_in_the_simulator():
    specs = _workload(200.0, count=60)
    mean = {}
    for name in ("fcfs", "expert-aware"):
        result = simulate(specs, ROUTING, _config(scheduler=name, budget=Budget(16, 16)))
        mean[name] = aggregate(result.requests, result.steps)["distinct_experts_per_step"]
    assert mean["expert-aware"] < 0.75 * mean["fcfs"], mean


def test_fit_cost_model_recovers_a_known_profile():
    truth = PROFILES["a100-llama2-7b"]
    layers = truth.num_layers
    samples = [StepSample(tokens, experts, truth.step_overhead_s
                          + layers * truth.layer_compute(tokens, experts))
               for tokens in (1, 16, 64, 256) for experts in (1, 3, 8)]
    fitted = fit_cost_model(samples, expert_bytes=truth.expert_bytes,
                            load_bandwidth=truth.load_bandwidth,
                            step_overhead_s=truth.step_overhead_s)
    for name in ("layer_fixed_s", "token_s", "expert_s"):
        assert getattr(fitted, name) == pytest.approx(getattr(truth, name), rel=1e-6)
    with pytest.raises(ReadmoeError, match="vary both"):
        fit_cost_model(samples[:1], expert_bytes=(1,), load_bandwidth=1.0)


def test_profile_registry():
    assert get_profile("a100-llama2-7b").load_time(0, 1) == pytest.approx(81.15e6 / 25e9,
                                                                           rel=1e-3)
    with pytest.raises(ReadmoeError, match="unknown cost profile"):
        get_profile("h100")


def test_per_layer_choices_drive_the_cache_of_a_layer_wise_router():
    specs = _workload(50.0, count=12)
    truth = {s.request_id: ROUTING.extend(s.prompt.experts, s.prompt.length + s.max_tokens - 1,
                                          random.Random(i)) for i, s in enumerate(specs)}
    same = {rid: [[e] * 2 for e in seq] for rid, seq in truth.items()}  # 2 spread over 4
    config = _config(router="layer-wise", prefetch=False, policy="lru")

    def replay():
        return ReplayRouting([(s.prompt.length, truth[s.request_id]) for s in specs])

    plain = simulate(specs, replay(), config)
    layered = simulate(specs, replay(), config, same)  # every layer agrees: nothing changes
    assert (layered.cache.hits, layered.cache.misses) == (plain.cache.hits, plain.cache.misses)
    rng = random.Random(5)
    mixed = {rid: [[rng.randrange(8) for _ in range(COST.num_layers)] for _ in seq]
             for rid, seq in truth.items()}
    result = simulate(specs, replay(), config, mixed)
    assert all(s.distinct_experts <= min(8, s.num_tokens) for s in result.steps)
    needed = sum(s.distinct_experts * COST.num_layers for s in result.steps)
    assert result.cache.hits + result.cache.misses == pytest.approx(needed)
    assert result.cache.misses > plain.cache.misses  # choices without locality miss more


def test_kv_admission_bounds_concurrency_as_the_engine_does():
    fixed = {"prompt_lengths": LengthModel(12.0, 1e-9, 64),
             "output_lengths": LengthModel(16.0, 1e-9, 64)}  # 27 tokens: 2 blocks of 16 each
    specs = synthetic_workload(20, float("inf"), routed_prompts(ROUTING), **fixed)
    roomy = simulate(specs, ROUTING, _config())
    tight = simulate(specs, ROUTING, _config(kv_blocks=5))  # room for 2 requests at a time
    assert len(tight.requests) == len(roomy.requests) == len(specs)
    assert max(s.num_seqs for s in tight.steps) <= 2 < max(s.num_seqs for s in roomy.steps)
    with pytest.raises(ReadmoeError, match="KV blocks"):
        simulate(specs, ROUTING, _config(kv_blocks=1))


def test_accesses_and_per_step_experts_are_recorded():
    specs = _workload(40.0, count=10)
    result = simulate(specs, ROUTING, _config())
    assert len(result.accesses) == len(result.steps) * COST.num_layers
    for step in result.steps:
        assert step.experts == tuple(sorted(set(step.token_experts)))
        assert len(step.token_experts) == step.num_tokens
    hits_and_misses = result.cache.hits + result.cache.misses
    assert hits_and_misses == sum(len(experts) for _, experts in result.accesses)


def test_next_step_prefetch_loads_ahead_and_hides_load_time():
    specs = _workload(20.0, count=30)
    plain = simulate(specs, ROUTING, _config(scheduler="cache-aware", capacity=2))
    ahead = simulate(specs, ROUTING, _config(scheduler="cache-aware", capacity=2,
                                             codesign=CoDesign("last", 1)))
    assert ahead.cache.prefetched > 0 and ahead.cache.prefetch_used > 0
    assert ahead.cache.hit_ratio > plain.cache.hit_ratio
    with pytest.raises(ReadmoeError, match="needs prefetch"):
        _config(prefetch=False, codesign=CoDesign("last", 1))


def test_the_dense_stream_loads_its_streamed_layers_every_step():
    dense = CostModel(num_layers=4, expert_bytes=(1000,) * 4, step_overhead_s=1e-3,
                      layer_fixed_s=1e-4, token_s=1e-6, expert_s=1e-4, load_bandwidth=1e6)
    specs = [replace(s, prompt=replace(s.prompt, experts=(0,) * s.prompt.length))
             for s in _workload(30.0, count=8)]
    zeros = ReplayRouting([(s.prompt.length, [0] * (s.prompt.length + s.max_tokens))
                           for s in specs])
    result = simulate(specs, zeros, _config(scheduler="fcfs", cost=dense, stream_budget=4000))
    assert result.cache.misses == 4  # everything fits: each layer loads once
    zeros = ReplayRouting([(s.prompt.length, [0] * (s.prompt.length + s.max_tokens))
                           for s in specs])
    tight = simulate(specs, zeros, _config(scheduler="fcfs", cost=dense, stream_budget=3000))
    steps = len(tight.steps)
    assert tight.cache.misses == 1 + 3 * steps  # 1 resident (cold load), 3 streamed each step
    assert tight.steps[-1].end_time > result.steps[-1].end_time
