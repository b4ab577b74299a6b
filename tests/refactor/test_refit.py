"""Least-squares refit of the down projection (issue 13, item 1): the second moments equal
the explicit mean of a a^T over the statistics' tokens; the refit equals a naive least-squares
solve over every calibration token with the same dampening; the refitted FFN reproduces the
dense output better than the plain slice on those tokens; save, load and the CLI keep it."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from readmoe.data.corpus import load_corpus
from readmoe.data.tokens import pack_blocks
from readmoe.errors import ReadmoeError
from readmoe.model import ReadMEForCausalLM
from readmoe.model.experts import ExpertGroups
from readmoe.refactor.gram import compute_grams
from readmoe.refactor.planners import make_planner
from readmoe.refactor.refit import refit_down_projections, refit_layer
from readmoe.refactor.slicing import save_readme, slice_dense
from readmoe.refactor.stats import compute_stats
from tests.conftest import char_tokenizer, mlp_inputs
from tests.refactor.test_slicing import dense_model, random_plan

TOKENS, BLOCK = 128, 32


def activations(dense, blocks: torch.Tensor) -> list[torch.Tensor]:
    """Per layer ``[N, I]`` float64: each token's down_proj input, recomputed from the FFN
    inputs by hand."""
    inputs = mlp_inputs(dense, blocks)
    result = []
    for index, layer in enumerate(dense.model.layers):
        mlp, x = layer.mlp, inputs[index].reshape(-1, inputs[index].shape[-1])
        result.append((mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)).double())
    return result


@pytest.fixture
def calibrated(tmp_path, tiny_corpus_dir):
    dense, tok = dense_model("llama"), char_tokenizer()
    corpus = load_corpus(tiny_corpus_dir)
    stats = compute_stats(dense, tok, corpus, tmp_path / "stats", model_name="tiny",
                          fingerprint="f", tokens_per_domain=TOKENS, block_size=BLOCK)
    with torch.no_grad():
        acts = {d: activations(dense, pack_blocks(tok, corpus.documents(d, "train"), BLOCK,
                                                  TOKENS)) for d in stats.domains}
    return dense, tok, corpus, stats, acts


@torch.no_grad()
def test_second_moments_are_the_mean_outer_product_and_are_reused(calibrated, tmp_path):
    dense, tok, corpus, stats, acts = calibrated
    grams = compute_grams(dense, tok, corpus, stats, tmp_path / "stats")
    assert grams.tokens == stats.tokens
    for domain in stats.domains:
        for index, a in enumerate(acts[domain]):
            torch.testing.assert_close(grams.layer(domain, index), a.T @ a / a.shape[0],
                                       rtol=1e-5, atol=1e-6)
    path = tmp_path / "stats" / "gram" / f"{stats.domains[0]}.safetensors"
    stamp = path.stat().st_mtime_ns
    compute_grams(dense, tok, corpus, stats, tmp_path / "stats")
    assert path.stat().st_mtime_ns == stamp  # current files are reused, not recomputed
    stats.tokens_requested = TOKENS // 2  # as if the statistics had been recomputed since
    stats.tokens = {d: TOKENS // 2 for d in stats.domains}
    compute_grams(dense, tok, corpus, stats, tmp_path / "stats")
    assert path.stat().st_mtime_ns != stamp


def naive_refit(down, lp, token_acts: list[torch.Tensor], damp: float, intercept: bool = False,
                token_targets: list[torch.Tensor] | None = None):
    """One explicit least-squares problem over every token: the shared columns see every
    token, expert e's columns only the tokens of ``token_acts[e]`` (with ``intercept`` also a
    column of ones of its own, after all the channels); dampening rows pull the solution
    towards the sliced columns and a zero bias. The targets are the dense FFN's outputs
    ``a @ down.T``, or ``token_targets[e]`` ``[N_e, H]`` where given."""
    down = down.double()
    size = lp.expert_size
    columns = lp.shared_size + size * len(token_acts) if size else lp.shared_size
    width = columns + (len(token_acts) if intercept else 0)
    rows, targets = [], []
    for e, a in enumerate(token_acts):
        design = torch.zeros(a.shape[0], width, dtype=torch.float64)
        design[:, :lp.shared_size] = a[:, lp.shared]
        if size:
            start = lp.shared_size + e * size
            design[:, start:start + size] = a[:, lp.experts[e]]
        if intercept:
            design[:, columns + e] = 1.0
        rows.append(design)
        targets.append(a @ down.T if token_targets is None else token_targets[e].double())
    design, target = torch.cat(rows), torch.cat(targets)
    lam = damp * float((design.square().sum(dim=0) / design.shape[0]).mean())
    blocks = [lp.shared] + ([lp.experts[e] for e in range(len(token_acts))] if size else [])
    start = torch.cat([down[:, b].T for b in blocks]
                      + [torch.zeros(width - columns, down.shape[0], dtype=torch.float64)])
    scale = (lam * design.shape[0]) ** 0.5
    design = torch.cat([design, scale * torch.eye(width, dtype=torch.float64)])
    target = torch.cat([target, scale * start])
    solution = torch.linalg.lstsq(design, target).solution  # [width, H]
    shared = solution[:lp.shared_size].T
    experts = [solution[lp.shared_size + e * size:lp.shared_size + (e + 1) * size].T
               for e in range(len(token_acts))] if size else []
    return shared, experts, solution[columns:]


@pytest.mark.parametrize("damp", [1e-3, 0.1])
def test_refit_equals_a_naive_least_squares_over_the_tokens(calibrated, damp):
    dense, _, _, stats, acts = calibrated
    plan = random_plan(4, shared_sizes=[20, 40], expert_sizes=[12, 0], num_experts=3)
    down = dense.model.layers[0].mlp.down_proj.weight.detach()
    lp = plan.layers[0]
    token_acts = [acts[d][0] for d in stats.domains]
    moments = [(a.T @ a / a.shape[0], a.shape[0]) for a in token_acts]
    shared, experts, bias = refit_layer(down, lp, moments, damp)
    assert bias is None
    want_shared, want_experts, _ = naive_refit(down, lp, token_acts, damp)
    torch.testing.assert_close(shared, want_shared, rtol=1e-6, atol=1e-7)
    for e in range(3):
        torch.testing.assert_close(experts[e], want_experts[e], rtol=1e-6, atol=1e-7)
    # a layer without a routed part: the shared columns alone, over all tokens together
    lp = plan.layers[1]
    everything = torch.cat(token_acts)
    shared, experts, _ = refit_layer(down, lp, [(everything.T @ everything / len(everything),
                                                 len(everything))], damp)
    torch.testing.assert_close(shared, naive_refit(down, lp, [everything], damp)[0],
                               rtol=1e-6, atol=1e-7)
    assert experts.shape == (3, 64, 0)


@pytest.mark.parametrize("damp", [1e-3, 0.1])
def test_refit_with_bias_equals_a_naive_least_squares_with_an_intercept(calibrated, damp):
    dense, _, _, stats, acts = calibrated
    plan = random_plan(4, shared_sizes=[20, 40], expert_sizes=[12, 0], num_experts=3)
    down = dense.model.layers[0].mlp.down_proj.weight.detach()
    token_acts = [acts[d][0] for d in stats.domains]
    moments = [(a.T @ a / a.shape[0], a.shape[0]) for a in token_acts]
    means = [a.mean(dim=0) for a in token_acts]
    shared, experts, bias = refit_layer(down, plan.layers[0], moments, damp, means)
    want_shared, want_experts, want_bias = naive_refit(down, plan.layers[0], token_acts, damp,
                                                       intercept=True)
    assert bias.shape == (3, 64)
    torch.testing.assert_close(shared, want_shared, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(bias, want_bias, rtol=1e-6, atol=1e-7)
    for e in range(3):
        torch.testing.assert_close(experts[e], want_experts[e], rtol=1e-6, atol=1e-7)
    everything = torch.cat(token_acts)
    shared, _, bias = refit_layer(down, plan.layers[1], [(everything.T @ everything /
                                                          len(everything), len(everything))],
                                  damp, [everything.mean(dim=0)])
    want_shared, _, want_bias = naive_refit(down, plan.layers[1], [everything], damp,
                                            intercept=True)
    assert bias.shape == (1, 64)
    torch.testing.assert_close(shared, want_shared, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(bias, want_bias, rtol=1e-6, atol=1e-7)
    with pytest.raises(ReadmoeError, match="mean activations"):
        refit_layer(down, plan.layers[0], moments, damp, means[:2])


@torch.no_grad()
def test_refit_with_bias_fits_the_calibration_tokens_at_least_as_well(calibrated, tmp_path):
    """Each layer is one least-squares problem over every calibration token; a bias is one
    more free column, so (undampened) its total error cannot grow."""
    dense, tok, corpus, stats, _ = calibrated
    grams = compute_grams(dense, tok, corpus, stats, tmp_path / "stats")
    for method in ("readme", "prune"):
        plan = make_planner(method).plan(stats, keep=0.5)
        down, none = refit_down_projections(dense, plan, grams, damp=1e-9)
        assert none is None
        down_b, biases = refit_down_projections(dense, plan, grams, damp=1e-9, stats=stats)
        assert [tuple(b.shape) for b in biases] == [
            (plan.num_experts if lp.expert_size else 1, dense.config.hidden_size)
            for lp in plan.layers]
        models = (slice_dense(dense, plan, down=down), slice_dense(dense, plan, biases, down_b))
        totals = torch.zeros(len(plan.layers), 2, dtype=torch.float64)
        for expert, domain in enumerate(stats.domains):
            blocks = pack_blocks(tok, corpus.documents(domain, "train"), BLOCK, TOKENS)
            inputs = mlp_inputs(dense, blocks)
            ids = torch.full(blocks.shape, expert if method == "readme" else 0)
            groups = ExpertGroups.from_expert_ids(ids, plan.num_experts)
            for index, x in inputs.items():
                want = dense.model.layers[index].mlp(x)
                for k, model in enumerate(models):
                    totals[index, k] += (model.model.layers[index].mlp(x, groups)
                                         - want).double().square().sum()
        assert (totals[:, 1] <= totals[:, 0] * (1 + 1e-4)).all(), (method, totals)
        assert (totals[:, 1] < totals[:, 0]).any(), method


@torch.no_grad()
def test_refitted_ffn_reproduces_the_dense_output_better_on_the_calibration_tokens(
        calibrated, tmp_path):
    dense, tok, corpus, stats, _ = calibrated
    grams = compute_grams(dense, tok, corpus, stats, tmp_path / "stats")
    for method in ("readme", "prune"):
        plan = make_planner(method).plan(stats, keep=0.5)
        plain = slice_dense(dense, plan)
        refitted = slice_dense(dense, plan, down=refit_down_projections(dense, plan, grams)[0])
        for expert, domain in enumerate(stats.domains):
            blocks = pack_blocks(tok, corpus.documents(domain, "train"), BLOCK, TOKENS)
            inputs = mlp_inputs(dense, blocks)
            ids = torch.full(blocks.shape, expert if method == "readme" else 0)
            groups = ExpertGroups.from_expert_ids(ids, plan.num_experts)
            for index in range(len(plan.layers)):
                x = inputs[index]
                want = dense.model.layers[index].mlp(x)
                before = (plain.model.layers[index].mlp(x, groups) - want).square().mean()
                after = (refitted.model.layers[index].mlp(x, groups) - want).square().mean()
                assert after < 0.9 * before, (method, domain, index)


def test_refit_shapes_are_checked(calibrated):
    dense, *_ = calibrated
    plan = random_plan(4, shared_sizes=[20, 40], expert_sizes=[12, 0], num_experts=3)
    wrong = [(torch.zeros(64, 21), torch.zeros(3, 64, 12)), (torch.zeros(64, 40),
                                                            torch.zeros(3, 64, 0))]
    with pytest.raises(ReadmoeError, match="refitted columns"):
        slice_dense(dense, plan, down=wrong)
    with pytest.raises(ReadmoeError, match="refitted layers"):
        slice_dense(dense, plan, down=wrong[:1])


def test_refactor_cli_refit_writes_the_refitted_columns_and_they_load(tmp_path, tiny_llama_dir,
                                                                     tiny_corpus_dir):
    from readmoe.cli import main
    from readmoe.refactor.plan import ExpertPlan

    args = ["refactor", str(tiny_llama_dir), "--corpus", str(tiny_corpus_dir), "--tokens",
            "256", "--block-size", "32", "--stats", str(tmp_path / "stats")]
    assert main(args + ["--out", str(tmp_path / "plain")]) == 0
    assert main(args + ["--out", str(tmp_path / "refit"), "--refit"]) == 0
    assert sorted(p.name for p in (tmp_path / "stats" / "gram").iterdir()) == [
        "digits.safetensors", "lower.safetensors", "upper.safetensors"]
    plain = load_file(str(tmp_path / "plain" / "model.safetensors"))
    refit = load_file(str(tmp_path / "refit" / "model.safetensors"))
    assert plain.keys() == refit.keys()
    for key in plain:
        if "down_proj" in key:
            assert not torch.equal(plain[key], refit[key]), key
        else:
            assert torch.equal(plain[key], refit[key]), key
    assert ExpertPlan.load(tmp_path / "refit" / "plan").meta["down_refit"]["bias"] is False
    assert main(args + ["--out", str(tmp_path / "both"), "--refit", "--compensate"]) == 0
    both = load_file(str(tmp_path / "both" / "model.safetensors"))
    assert set(both) - set(refit) and all(
        not torch.equal(both[k], refit[k]) for k in refit if "down_proj" in k)
    assert ExpertPlan.load(tmp_path / "both" / "plan").meta["down_refit"]["bias"] is True
    assert ReadMEForCausalLM.from_pretrained(tmp_path / "both").config.compensation
    loaded = ReadMEForCausalLM.from_pretrained(tmp_path / "refit")
    key = "model.layers.0.mlp.experts.down_proj"
    assert torch.equal(loaded.state_dict()[key], refit[key])
    save_readme(loaded, tmp_path / "again")
    again = load_file(str(tmp_path / "again" / "model.safetensors"))
    assert all(torch.equal(again[k], refit[k]) for k in refit)
