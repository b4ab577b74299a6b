"""ExpertStore: every tier yields the model's weights bitwise in the runner's packed layout,
plans execute with the counts the simulator's bare cache gets, prefetch and on-demand differ
only in when loads are issued, and bad uses are refused."""

from __future__ import annotations

import random

import pytest
import torch

from readmoe.errors import ReadmoeError
from readmoe.serve.experts import CoDesign, ExpertCache, ExpertPlanner, StepPlan, make_policy
from readmoe.serve.experts.loader import CopyEngine
from readmoe.serve.experts.store import ExpertStore
from readmoe.serve.types import Batch, Chunk
from tests.model.test_modeling_readme import NUM_EXPERTS
from tests.serve.helpers import saved_tiny_readme

ROUTED = (0, 1)  # the tiny model's layer 2 has no routed experts


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return saved_tiny_readme(tmp_path_factory, 3, "store")


def _sources(saved):
    model, folder = saved
    return [(folder, "file"), (folder, "ram"), (model.state_dict(), "ram")]


def _steps(seed: int, count: int, largest: int) -> list[tuple[int, ...]]:
    rng = random.Random(seed)
    return [tuple(sorted(rng.sample(range(NUM_EXPERTS), rng.randint(1, largest))))
            for _ in range(count)]


def _batch(experts) -> Batch:
    return Batch(tuple(Chunk(f"r{e}", 0, (e,), True, True) for e in experts))


def _run(store, steps, prefetch=True, check=None):
    planner = store.planner()
    for step, experts in enumerate(steps):
        access = store.begin_step(planner.plan(step, _batch(experts), [], 8), prefetch)
        for layer in ROUTED:
            seen = []
            for expert, weights in access.layer(layer, experts):
                seen.append(expert)
                if check is not None:
                    check(layer, expert, weights)
            assert sorted(seen) == list(experts)
            assert len(store.cache.resident(layer)) <= store.capacity
        access.finish()


@pytest.mark.parametrize("index", range(3))
def test_every_tier_returns_the_models_weights_bitwise(saved, index):
    model, _ = saved
    source, tier = _sources(saved)[index]
    checked = []

    def check(layer, expert, weights):
        ref = model.model.layers[layer].mlp.experts
        gate_up = torch.cat([ref.gate_proj[expert], ref.up_proj[expert]]).t()  # [H, 2R]
        checked.append(torch.equal(weights.gate_up.weight, gate_up)
                       and torch.equal(weights.down.weight, ref.down_proj[expert].t()))
    with ExpertStore(source, capacity=2, policy="lru", tier=tier) as store:
        assert store.routed_layers == list(ROUTED) and store.num_layers == 3
        for prefetch in (True, False):  # over capacity too: computed in the plan's order
            _run(store, _steps(index, 12, NUM_EXPERTS), prefetch, check)
    assert checked and all(checked)


@pytest.mark.parametrize("policy", ["random", "lru", "lfu", "belady"])
def test_counts_equal_a_bare_cache_fed_the_same_plans(saved, policy):
    _, folder = saved
    steps = _steps(1, 40, 3)  # some need more experts than the 2 slots
    with ExpertStore(folder, capacity=2, policy=policy, tier="file") as store:
        _run(store, steps)
        stats = store.stats
        expert_bytes = store.expert_bytes
    bare = ExpertCache(2, expert_bytes, make_policy(policy))
    planner = ExpertPlanner(bare, 3, list(ROUTED))
    for step, experts in enumerate(steps):
        planner.plan(step, _batch(experts), [], 8)
    assert (stats.hits, stats.misses, stats.evictions, stats.bytes_moved) == (
        bare.stats.hits, bare.stats.misses, bare.stats.evictions, bare.stats.bytes_moved)
    assert stats.hits + stats.misses == sum(map(len, steps)) * len(ROUTED)
    # layer 1: gate, up [R=40, H=64] and down [64, 40], fp32
    assert expert_bytes[1] == 3 * 40 * 64 * 4 and expert_bytes[2] == 0
    assert stats.load_s > 0


class _Recorder(CopyEngine):
    """A synchronous copy engine that records, for each load, the compute progress at issue."""

    def __init__(self) -> None:
        self.issued: list[int] = []
        self.progress = -1
        self._loads = 0

    def submit(self, copy, nbytes, after=None, background=False, follows=None):
        assert after is None or after <= self.progress, "a load ran before its compute"
        self.issued.append(self.progress)
        copy()
        self._loads += 1
        return self._loads - 1

    def promote(self, ticket):
        pass

    def computed(self, position):
        self.progress = max(self.progress, position)

    def wait(self, ticket):
        return 0.0

    @property
    def load_s(self):
        return 0.0

    def close(self):
        pass


def _issue_progress(store, steps, prefetch):
    recorder = _Recorder()
    store._copy = recorder
    planner = store.planner()
    for step, experts in enumerate(steps):
        access = store.begin_step(planner.plan(step, _batch(experts), [], 8), prefetch)
        for layer in ROUTED:
            for _ in access.layer(layer, experts):
                pass
        access.finish()
    return recorder.issued


def test_prefetch_issues_a_steps_loads_at_its_start_on_demand_at_each_layer(saved):
    _, folder = saved
    steps = [(0, 1), (1, 2), (0, 2)]  # within the 2 slots: no load waits for compute
    with ExpertStore(folder, capacity=2, tier="ram") as store:
        ahead = _issue_progress(store, steps, prefetch=True)
    with ExpertStore(folder, capacity=2, tier="ram") as store:
        on_demand = _issue_progress(store, steps, prefetch=False)
    # positions: 2 experts per routed layer per step; step s starts after 4 s positions
    assert ahead == [-1, -1, -1, -1, 3, 3, 7, 7]
    assert on_demand == [-1, -1, 1, 1, 3, 5, 7, 9]


def test_speculative_loads_run_with_the_step_and_are_used_by_the_next(saved):
    model, folder = saved
    from readmoe.serve.types import Request, RequestState

    going_on = Request("r0", 0.0, [0], 9, num_computed=1, state=RequestState.RUNNING)
    waiting = [Request(f"w{i}", 1.0, [2], 4) for i in range(2)]
    with ExpertStore(folder, capacity=1, tier="ram") as store:
        planner = store.planner(CoDesign("last", prefetch_rate=1))
        plan = planner.plan(0, _batch([1]), [going_on, *waiting], 8)
        assert [ld.expert for ld in plan.speculative] == [2, 2]  # 2 wanted by 2, 1 by nobody
        access = store.begin_step(plan, prefetch=True)
        for layer in ROUTED:
            assert [e for e, _ in access.layer(layer, [1])] == [1]
        access.finish()
        nxt = planner.plan(1, _batch([2]), [], 8)
        assert all(not p.loads for p in nxt.layers.values())  # already resident: hits
        access = store.begin_step(nxt, prefetch=True)
        for layer in ROUTED:
            ((expert, weights),) = list(access.layer(layer, [2]))
            ref = model.model.layers[layer].mlp.experts.down_proj[2].t()
            assert expert == 2 and torch.equal(weights.down.weight, ref)
        access.finish()
        stats = store.stats
    assert (stats.prefetched, stats.prefetch_used, stats.hits) == (2, 2, 2)


def test_bad_uses_are_refused(saved):
    model, folder = saved
    with pytest.raises(ReadmoeError, match="tier"):
        ExpertStore(folder, capacity=2, tier="disk")
    with pytest.raises(ReadmoeError, match="model folder"):
        ExpertStore(model.state_dict(), capacity=2, tier="file")
    with pytest.raises(ReadmoeError, match="emulated link"):
        ExpertStore(folder, capacity=2, bandwidth=1e9, device="cuda")
    with ExpertStore(folder, capacity=2) as store:
        plan = store.planner().plan(0, _batch([0]), [], 8)
        access = store.begin_step(plan, prefetch=True)
        with pytest.raises(ReadmoeError, match="was planned for experts"):
            list(access.layer(0, [1]))
        with pytest.raises(ReadmoeError, match="plan_layer"):
            store.begin_step(StepPlan(1), prefetch=False)
    with ExpertStore(folder, capacity=1, tier="ram", bandwidth=1e9) as store:
        assert store.describe() == "CPU RAM + emulated link 1 GB/s -> cpu (capacity 1 per layer)"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_copies_are_bitwise_with_and_without_prefetch(saved):
    model, folder = saved
    checked = []

    def check(layer, expert, weights):
        ref = model.model.layers[layer].mlp.experts.down_proj[expert]
        checked.append(torch.equal(weights.down.weight.cpu(), ref))
    for tier in ("file", "ram"):
        with ExpertStore(folder, capacity=2, tier=tier, device="cuda") as store:
            for prefetch in (True, False):
                _run(store, _steps(4, 10, NUM_EXPERTS), prefetch, check)
    assert checked and all(checked)
