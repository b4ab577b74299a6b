from __future__ import annotations

import pytest
import torch

from readmoe.errors import ReadmoeError
from readmoe.refactor.plan import ExpertPlan
from readmoe.refactor.planners import PLANNERS, make_planner, top_channels
from readmoe.refactor.stats import ActivationStats


def random_stats(domains=("a", "b", "c", "d"), layers=3, size=40, seed=0) -> ActivationStats:
    gen = torch.Generator().manual_seed(seed)
    base = torch.rand(layers, size, generator=gen)
    mean_abs = {d: base + 0.6 * torch.rand(layers, size, generator=gen) for d in domains}
    return ActivationStats(model="m", fingerprint="f", num_layers=layers, intermediate_size=size,
                           corpus="c", corpus_fingerprint="cf", block_size=8,
                           tokens_requested=8, mean_abs=mean_abs,
                           tokens=dict.fromkeys(domains, 8))


def test_readme_plan_matches_paper_definition():
    stats = random_stats()
    plan = make_planner("readme").plan(stats, keep=0.5)
    assert plan.expert_names == ["a", "b", "c", "d"]
    for layer, lp in enumerate(plan.layers):
        masks = []
        for d in stats.domains:
            order = sorted(range(40), key=lambda i: (-float(stats.mean_abs[d][layer, i]), i))
            masks.append(set(order[:20]))
        shared = set.intersection(*masks)
        assert set(lp.shared.tolist()) == shared
        for e, mask in enumerate(masks):
            assert set(lp.experts[e].tolist()) == mask - shared
            # exactly keep * I channels active per token: shared + one routed expert
            assert lp.shared_size + lp.expert_size == 20


@pytest.mark.parametrize("method", sorted(PLANNERS))
def test_every_planner_gives_equal_active_width(method):
    stats = random_stats(seed=3)
    reference = make_planner("readme").plan(stats, keep=0.5)
    plan = make_planner(method, seed=1).plan(stats, keep=0.5)
    plan.validate()
    assert plan.active_sizes() == reference.active_sizes()
    if method != "prune":
        for lp, ref in zip(plan.layers, reference.layers, strict=True):
            assert torch.equal(lp.shared, ref.shared)


def test_random_planner_spreads_channels_evenly():
    stats = random_stats(seed=5, size=64)
    plan = make_planner("random", seed=0).plan(stats, keep=0.5)
    for lp in plan.layers:
        counts = torch.bincount(lp.experts.flatten(), minlength=64)
        free = counts[counts > 0]
        assert int(free.max()) - int(free.min()) <= 1


def test_cluster_planner_groups_domain_specific_channels():
    # channels 0-9 fire only for domain a, 10-19 only for b: clusters must separate them
    size, layers = 40, 1
    mean_abs = {"a": torch.full((layers, size), 0.1), "b": torch.full((layers, size), 0.1)}
    mean_abs["a"][0, :10] = 5.0
    mean_abs["b"][0, 10:20] = 5.0
    mean_abs["a"][0, 20:30] = mean_abs["b"][0, 20:30] = 3.0
    stats = ActivationStats("m", "f", layers, size, "c", "cf", 8, 8, mean_abs, {"a": 8, "b": 8})
    plan = make_planner("cluster").plan(stats, keep=0.5)
    experts = [set(row.tolist()) for row in plan.layers[0].experts]
    assert set(range(10)) in experts and set(range(10, 20)) in experts


def test_cluster_planner_keeps_strong_channels_together():
    # Free channels come in two directions, (4, 1) and (1, 4), each strong (10-19, 20-29)
    # and weak (0-4, 5-9: a tenth of the magnitude); 30-39 are shared. Each expert must take
    # the strong channels of its direction; clustering normalised profiles sees strong and
    # weak channels as the same point and filled experts with weak ones (lower indices).
    size, layers = 40, 1
    profile = torch.zeros(size, 2)
    profile[0:5], profile[5:10] = torch.tensor([0.4, 0.1]), torch.tensor([0.1, 0.4])
    profile[10:20], profile[20:30] = torch.tensor([4.0, 1.0]), torch.tensor([1.0, 4.0])
    profile[30:40] = 9.0
    mean_abs = {"a": profile[None, :, 0].clone(), "b": profile[None, :, 1].clone()}
    stats = ActivationStats("m", "f", layers, size, "c", "cf", 8, 8, mean_abs, {"a": 8, "b": 8})
    for seed in range(4):
        plan = make_planner("cluster", seed=seed).plan(stats, keep=0.5)
        assert plan.layers[0].shared.tolist() == list(range(30, 40))
        experts = sorted(sorted(row.tolist()) for row in plan.layers[0].experts)
        assert experts == [list(range(10, 20)), list(range(20, 30))], seed


def test_top_channels_breaks_ties_by_index():
    assert top_channels(torch.tensor([1.0, 2.0, 2.0, 2.0]), 2).tolist() == [1, 2]


def test_plan_save_load_round_trip(tmp_path):
    plan = make_planner("readme").plan(random_stats(), keep=0.5)
    plan.save(tmp_path / "plan")
    loaded = ExpertPlan.load(tmp_path / "plan")
    assert loaded.expert_names == plan.expert_names
    for a, b in zip(plan.layers, loaded.layers, strict=True):
        assert torch.equal(a.shared, b.shared) and torch.equal(a.experts, b.experts)


@pytest.mark.parametrize("keep", [0.0, -0.1, 1.5])
def test_refuses_keep_outside_unit_interval(keep):
    with pytest.raises(ReadmoeError, match="--keep must be in"):
        make_planner("readme").plan(random_stats(), keep=keep)


def test_refuses_single_domain():
    with pytest.raises(ReadmoeError, match="at least 2 domains"):
        make_planner("readme").plan(random_stats(domains=("a",)), keep=0.5)


def test_refuses_unknown_method():
    with pytest.raises(ReadmoeError, match="unknown planning method"):
        make_planner("magic")


def test_validate_rejects_shared_channel_inside_expert():
    plan = make_planner("readme").plan(random_stats(), keep=0.5)
    lp = plan.layers[0]
    if lp.shared_size:
        lp.experts[0, 0] = lp.shared[0]
        with pytest.raises(ReadmoeError):
            plan.validate()
