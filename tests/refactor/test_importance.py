"""Channel importance criteria (issue 13, item 1): each scores and ranks channels as its
definition says, computed here the slow way from the FFN's own output terms; the plan records
the criterion; one criterion carves both ReadME experts and the prune baseline; statistics
without mean squares are refused only for `contribution`, before any model loads."""

from __future__ import annotations

import json

import pytest
import torch

import readmoe.models
import readmoe.refactor.pipeline as pipeline
from readmoe.cli import main
from readmoe.errors import ReadmoeError
from readmoe.refactor.importance import CRITERIA, channel_importance
from readmoe.refactor.plan import PLAN_JSON, ExpertPlan
from readmoe.refactor.planners import make_planner
from readmoe.refactor.slicing import PLAN_DIR
from readmoe.refactor.stats import KINDS, ActivationStats, domain_means
from tests.conftest import mlp_inputs, tiny_model

STATS_ARGS = ["--tokens", "256", "--block-size", "32"]


@torch.no_grad()
def ffn_terms(model, blocks: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer: each token's down_proj input `[N, I]` (rebuilt in fp64 from the MLP's input
    and weights, not by the statistics code) and each channel's output term a_c W[:, c],
    `[N, H, I]`."""
    inputs = mlp_inputs(model, blocks)
    rows = []
    for index, layer in enumerate(model.model.layers):
        mlp, hidden = layer.mlp, inputs[index].flatten(0, 1).double()
        act = (torch.nn.functional.silu(hidden @ mlp.gate_proj.weight.double().T)
               * (hidden @ mlp.up_proj.weight.double().T))
        rows.append((act, act[:, None, :] * mlp.down_proj.weight.double()[None]))
    return rows


def naive_scores(model, blocks: torch.Tensor, criterion: str) -> torch.Tensor:
    """`[L, I]` by definition: mean |a_c|, mean ||a_c W[:, c]|| or mean ||a_c W[:, c]||^2."""
    rows = []
    for act, term in ffn_terms(model, blocks):
        if criterion == "activation":
            rows.append(act.abs().mean(dim=0))
        elif criterion == "weighted":
            rows.append(term.norm(dim=1).mean(dim=0))
        else:
            rows.append(term.square().sum(dim=1).mean(dim=0))
    return torch.stack(rows)


@pytest.fixture(scope="module")
def setting():
    """A tiny dense model, three 'domains' of random tokens and their statistics."""
    model = tiny_model()
    blocks = {d: torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(s))
              for s, d in enumerate(("a", "b", "c"))}
    kinds: dict[str, dict] = {kind: {} for kind in KINDS}
    for domain, block in blocks.items():
        for kind, value in zip(KINDS, domain_means(model, block, 2, domain), strict=True):
            kinds[kind][domain] = value
    stats = ActivationStats("m", "f", 2, 128, "c", "cf", 16, 32, **kinds,
                            tokens=dict.fromkeys(blocks, 32))
    return model, blocks, stats


@pytest.mark.parametrize("criterion", CRITERIA)
def test_scores_equal_the_definition(setting, criterion):
    model, blocks, stats = setting
    importance = channel_importance(stats, criterion, model)
    assert importance.criterion == criterion
    for domain, block in blocks.items():
        torch.testing.assert_close(importance.scores[domain],
                                   naive_scores(model, block, criterion), rtol=1e-4, atol=1e-9)


def top_set(scores: torch.Tensor, count: int) -> set[int]:
    return set(sorted(range(scores.numel()), key=lambda c: (-float(scores[c]), c))[:count])


@pytest.mark.parametrize("criterion", CRITERIA)
def test_readme_and_prune_rank_by_the_criterion(setting, criterion):
    model, blocks, stats = setting
    naive = {d: naive_scores(model, b, criterion) for d, b in blocks.items()}
    activation = {d: naive_scores(model, b, "activation") for d, b in blocks.items()}
    importance = channel_importance(stats, criterion, model)
    readme = make_planner("readme").plan(stats, keep=0.5, importance=importance)
    prune = make_planner("prune").plan(stats, keep=0.5, importance=importance)
    differs = False
    for layer in range(2):
        masks = [top_set(naive[d][layer], 64) for d in stats.domains]
        shared = set.intersection(*masks)
        lp = readme.layers[layer]
        assert set(lp.shared.tolist()) == shared
        for e, mask in enumerate(masks):
            assert set(lp.experts[e].tolist()) == mask - shared
        mean = sum(naive[d][layer] / naive[d][layer].mean() for d in stats.domains) / 3
        kept = top_set(mean, lp.shared_size + lp.expert_size)
        assert set(prune.layers[layer].shared.tolist()) == kept
        differs |= any(m != top_set(activation[d][layer], 64)
                       for m, d in zip(masks, stats.domains, strict=True))
    # the criteria really rank differently here, so the checks above can tell them apart
    assert differs == (criterion != "activation")


def test_plan_records_the_criterion(setting, tmp_path):
    model, _, stats = setting
    plan = make_planner("cluster").plan(stats, 0.5, channel_importance(stats, "weighted", model))
    assert plan.importance == "weighted"
    assert make_planner("random").plan(stats, 0.5).importance == "activation"
    plan.save(tmp_path / "plan")
    info = json.loads((tmp_path / "plan" / PLAN_JSON).read_text())
    assert info["importance"] == "weighted"
    assert ExpertPlan.load(tmp_path / "plan").importance == "weighted"
    del info["importance"]  # a plan written before the criterion was recorded
    (tmp_path / "plan" / PLAN_JSON).write_text(json.dumps(info))
    assert ExpertPlan.load(tmp_path / "plan").importance == "activation"


def test_missing_mean_squares_refuse_only_contribution(setting):
    model, _, stats = setting
    old = ActivationStats(**{**vars(stats), "mean_sq": {}})  # as written by an older readmoe
    with pytest.raises(ReadmoeError, match="contribution needs them.*--recompute-stats"):
        channel_importance(old, "contribution", model)
    for criterion in ("activation", "weighted"):
        assert channel_importance(old, criterion, model).criterion == criterion
    with pytest.raises(ReadmoeError, match="needs the dense model"):
        channel_importance(stats, "weighted")
    with pytest.raises(ReadmoeError, match="unknown importance criterion 'magic'"):
        channel_importance(stats, "magic", model)


def test_refactor_with_each_criterion_gives_a_loadable_model(tmp_path, tiny_llama_dir,
                                                             tiny_corpus_dir):
    from readmoe.models import load_model

    stats, plans = tmp_path / "stats", {}
    for criterion in CRITERIA:
        for method in ("readme", "prune"):
            out = tmp_path / f"{method}-{criterion}"
            assert main(["refactor", str(tiny_llama_dir), "--corpus", str(tiny_corpus_dir),
                         "--out", str(out), "--method", method, "--importance", criterion,
                         "--stats", str(stats), *STATS_ARGS]) == 0
            plan = plans[method, criterion] = ExpertPlan.load(out / PLAN_DIR)
            assert plan.importance == criterion
            model = load_model(str(out))
            routing = {"expert_ids": torch.tensor([0, 2])} if method == "readme" else {}
            with torch.no_grad():
                logits = model(torch.randint(0, 128, (2, 12)), **routing).logits
            assert logits.shape == (2, 12, 128) and torch.isfinite(logits).all()
    # every variant is active at the same width, but carved from other channels
    widths = {tuple(plan.active_sizes()) for plan in plans.values()}
    assert len(widths) == 1
    for criterion in ("weighted", "contribution"):
        assert any(not torch.equal(a.shared, b.shared) for a, b in zip(
            plans["readme", "activation"].layers, plans["readme", criterion].layers,
            strict=True))


def test_refactor_refuses_contribution_on_old_stats_before_loading(
        tmp_path, tiny_llama_dir, tiny_corpus_dir, monkeypatch, capsys):
    folder = tmp_path / "stats"
    assert main(["stats", str(tiny_llama_dir), "--corpus", str(tiny_corpus_dir), "--out",
                 str(folder), *STATS_ARGS]) == 0
    old = ActivationStats.load(folder)
    old.mean_sq.clear()
    old.save(folder)

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(pipeline, "compute_stats", refuse)
    monkeypatch.setattr(readmoe.models, "load_model", refuse)
    out = tmp_path / "moe"
    assert main(["refactor", str(tiny_llama_dir), "--corpus", str(tiny_corpus_dir), "--out",
                 str(out), "--importance", "contribution", "--stats", str(folder)]) == 2
    assert "--recompute-stats" in capsys.readouterr().err
    assert not out.exists()
