"""The engine with routed experts offloaded to an ExpertStore: unchanged greedy output under
every policy, capacity, prefetch mode and co-design option, load/stall accounting, the
layer-wise model on demand, the dense stream, and hits and per-step expert sets equal to the
simulator's on the same workload."""

from __future__ import annotations

import pytest
import torch

from readmoe.errors import ReadmoeError
from readmoe.serve.cost import CostModel
from readmoe.serve.crosscheck import engine_vs_simulator
from readmoe.serve.engine import Engine
from readmoe.serve.experts import CoDesign
from readmoe.serve.experts.store import ExpertStore
from readmoe.serve.sampling import SamplingParams
from readmoe.serve.types import Budget
from readmoe.serve.workload import Prompt, RequestSpec
from tests.conftest import char_tokenizer
from tests.serve.test_engine import VOCAB, readme

LENGTHS = (5, 17, 9, 30, 12)
BUDGET = Budget(max_tokens=12, max_seqs=4)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model = readme()
    folder = tmp_path_factory.mktemp("engine-store") / "model"
    model.save_pretrained(folder)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in LENGTHS]
    return model, folder, prompts


def _generate(model, prompts, store=None, prefetch=True, scheduler="fcfs", codesign=None):
    engine = Engine(model, char_tokenizer(), scheduler, BUDGET, kv_blocks=40, block_size=4,
                    expert_store=store, prefetch=prefetch, codesign=codesign)
    outputs = engine.generate(prompts, SamplingParams(max_tokens=8, ignore_eos=True))
    return [o.token_ids for o in outputs], engine


@pytest.mark.parametrize("policy", ["random", "lru", "lfu", "belady"])
@pytest.mark.parametrize("capacity", [1, 2])
@pytest.mark.parametrize("prefetch", [False, True])
def test_offloaded_engine_decodes_exactly_like_the_resident_one(served, policy, capacity,
                                                                prefetch):
    model, folder, prompts = served
    expected, _ = _generate(model, prompts)
    with ExpertStore(folder, capacity=capacity, policy=policy) as store:
        got, engine = _generate(model, prompts, store, prefetch, "expert-aware")
        stats = store.stats
    resident, _ = _generate(model, prompts, scheduler="expert-aware")
    assert got == resident and sorted(map(tuple, got)) == sorted(map(tuple, expected))
    assert stats.misses > 0 and stats.hits + stats.misses > 0
    assert sum(s.stall_s for s in engine.steps) == pytest.approx(stats.stall_s)
    assert engine.metrics()["cache"]["misses"] == stats.misses
    assert [s.experts for s in engine.steps] == [tuple(sorted(set(s.token_experts)))
                                                 for s in engine.steps]


@pytest.mark.parametrize("scheduler", ["fcfs", "cache-aware"])
@pytest.mark.parametrize("codesign", [CoDesign("last"), CoDesign("mode-3", 1),
                                      CoDesign("last", 2)])
def test_codesign_changes_no_token(served, scheduler, codesign):
    model, folder, prompts = served
    resident, _ = _generate(model, prompts, scheduler=scheduler)
    with ExpertStore(folder, capacity=1, policy="belady", tier="ram") as store:
        got, engine = _generate(model, prompts, store, True, scheduler, codesign)
        stats = store.stats
    assert got == resident
    if codesign.prefetch_rate:
        assert stats.prefetched > 0 and stats.prefetch_used <= stats.prefetched
    with ExpertStore(folder, capacity=1, tier="ram") as store, pytest.raises(
            ReadmoeError, match="needs prefetch on"):
        Engine(model, char_tokenizer(), expert_store=store, prefetch=False,
               codesign=CoDesign("last", 1))


def test_layerwise_model_runs_on_demand_only(tmp_path):
    model = readme("layerwise")
    model.save_pretrained(tmp_path)
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    expected, _ = _generate(model, prompts)
    with ExpertStore(tmp_path, capacity=1, policy="lru") as store:
        with pytest.raises(ReadmoeError, match="prefetch"):
            Engine(model, char_tokenizer(), expert_store=store, prefetch=True)
        got, _ = _generate(model, prompts, store, prefetch=False)
        assert store.stats.misses > 0
    assert got == expected


def test_a_store_of_another_model_is_refused(served):
    model, _, _ = served
    other = {name: tensor for name, tensor in model.state_dict().items()
             if not name.startswith("model.layers.1.mlp.experts.")}  # layer 1 not routed
    with ExpertStore(other, capacity=1, tier="ram") as store, pytest.raises(
            ReadmoeError, match="another"):
        Engine(model, char_tokenizer(), expert_store=store)


COST = CostModel(num_layers=3, expert_bytes=(1000, 1000, 0),  # layer 2 has no routed experts
                 step_overhead_s=1e-3, layer_fixed_s=1e-3, token_s=1e-4, expert_s=5e-4,
                 load_bandwidth=1e6)


@pytest.mark.parametrize("scheduler", ["fcfs", "expert-aware", "cache-aware"])
@pytest.mark.parametrize("policy", ["random", "lru", "belady"])
@pytest.mark.parametrize("prefetch", [False, True])
def test_engine_and_simulator_agree_on_hits_and_schedule(served, scheduler, policy, prefetch):
    model, folder, prompts = served
    specs = [RequestSpec(f"r{i}", 0.0, Prompt(len(p), tokens=tuple(p)), 6)
             for i, p in enumerate(prompts)]
    codesign = CoDesign("last", 1 if prefetch else 0)
    result = engine_vs_simulator(
        model, char_tokenizer(), specs, lambda: ExpertStore(folder, capacity=1, policy=policy),
        scheduler=scheduler, budget=BUDGET, prefetch=prefetch, codesign=codesign,
        kv_blocks=12, block_size=4, cost=COST)  # 12 blocks: admission is bounded by KV room
    assert result["schedules_agree"] and result["hits_agree"]
    assert result["engine"]["cache"]["misses"] == result["simulator"]["cache"]["misses"] > 0
    assert result["engine"]["requests"] == result["simulator"]["requests"] == len(specs)
    overhead = result["store_overhead_s"]
    assert overhead >= 0 and result["cost_model"]["step_overhead_s"] == pytest.approx(
        COST.step_overhead_s + overhead)
    if overhead == 0:
        assert result["mean_latency_error"] == result["mean_latency_error_resident_fit_only"]
