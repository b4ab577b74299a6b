"""Sequential refit (``refactor --refit --sequential``): each layer's columns equal a naive
least-squares solve over the down_proj inputs of a model whose earlier layers were replaced,
weight by weight, by their carved and refitted versions, each domain through its own expert;
the CLI writes and loads the result and refuses what it cannot route."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from readmoe.errors import ReadmoeError
from readmoe.refactor.planners import make_planner
from readmoe.refactor.sequential import sequential_refit
from tests.refactor.test_refit import BLOCK, activations, calibrated, naive_refit  # noqa: F401


def naive_carved_weight(lp, shared, experts, expert, bias, intermediate):
    """The ``[H, I]`` down weight (and bias) one domain's tokens meet in a carved layer, built
    column by column."""
    weight = torch.zeros(shared.shape[0], intermediate, dtype=torch.float64)
    for j, channel in enumerate(lp.shared.tolist()):
        weight[:, channel] += shared[:, j].double()
    if expert is not None:
        for j, channel in enumerate(lp.experts[expert].tolist()):
            weight[:, channel] += experts[expert][:, j].double()
    return weight, None if bias is None else bias[expert or 0].double()


@torch.no_grad()
def layer_target(dense, model, blocks, index):
    """``[N, H]``: the dense model's layer ``index`` output on its own inputs minus ``model``'s
    residual stream there (the input of that layer's post-attention norm), per token."""
    caught = {}
    handles = [dense.model.layers[index].register_forward_hook(
                   lambda _m, _i, out: caught.__setitem__("dense", out)),
               model.model.layers[index].post_attention_layernorm.register_forward_pre_hook(
                   lambda _m, inputs: caught.__setitem__("residual", inputs[0]))]
    try:
        dense(input_ids=blocks)
        model(input_ids=blocks)
    finally:
        for handle in handles:
            handle.remove()
    out = caught["dense"][0] if isinstance(caught["dense"], tuple) else caught["dense"]
    return (out - caught["residual"]).reshape(-1, out.shape[-1])


def naive_sequential(dense, plan, blocks, damp, with_bias, target="ffn"):
    """Layer by layer: for each domain a fresh copy of the dense model whose earlier layers'
    down_proj are replaced by the carved ones (a biased Linear where fitted), its activations
    at this layer recomputed by hand, and the naive least squares over them (targets: the
    dense FFN's output on them, or for ``layer`` ``layer_target``)."""
    names, domains = plan.expert_names, sorted(blocks)
    intermediate = dense.config.intermediate_size
    fitted = []
    for index, lp in enumerate(plan.layers):
        acts, wanted = {}, {}
        for domain in domains:
            model = copy.deepcopy(dense)
            for k in range(index):
                shared, experts, bias = fitted[k]
                expert = names.index(domain) if plan.layers[k].expert_size else None
                weight, offset = naive_carved_weight(plan.layers[k], shared, experts, expert,
                                                     bias, intermediate)
                linear = torch.nn.Linear(intermediate, dense.config.hidden_size,
                                         bias=offset is not None)
                linear.weight.data = weight.float()
                if offset is not None:
                    linear.bias.data = offset.float()
                model.model.layers[k].mlp.down_proj = linear
            with torch.no_grad():
                acts[domain] = activations(model, blocks[domain])[index]
            if target == "layer":
                wanted[domain] = layer_target(dense, model, blocks[domain], index)
        token_acts = ([acts[n] for n in names] if lp.expert_size
                      else [torch.cat([acts[d] for d in domains])])
        token_targets = None if target == "ffn" else (
            [wanted[n] for n in names] if lp.expert_size
            else [torch.cat([wanted[d] for d in domains])])
        down = dense.model.layers[index].mlp.down_proj.weight.detach()
        shared, experts, bias = naive_refit(down, lp, token_acts, damp, intercept=with_bias,
                                            token_targets=token_targets)
        fitted.append((shared, experts, bias if with_bias else None))
    return fitted


@pytest.mark.parametrize("method", ["readme", "prune"])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("target", ["ffn", "layer"])
def test_sequential_refit_equals_a_naive_layer_by_layer_solve(calibrated, method,  # noqa: F811
                                                              with_bias, target):
    dense, tok, corpus, stats, _ = calibrated
    plan = make_planner(method).plan(stats, keep=0.5)
    blocks = {d: stats.blocks(tok, corpus, d) for d in stats.domains}
    down, biases = sequential_refit(dense, plan, blocks, damp=0.01, bias=with_bias,
                                    batch_size=3, target=target)
    want = naive_sequential(dense, plan, blocks, 0.01, with_bias, target)
    assert (biases is None) != with_bias
    for index, (shared, experts, bias) in enumerate(want):
        torch.testing.assert_close(down[index][0].double(), shared, rtol=1e-4, atol=1e-5)
        for e, columns in enumerate(experts):
            torch.testing.assert_close(down[index][1][e].double(), columns, rtol=1e-4,
                                       atol=1e-5)
        if with_bias:
            torch.testing.assert_close(biases[index].double(), bias, rtol=1e-4, atol=1e-5)


def test_sequential_refit_differs_from_the_plain_one_after_the_first_layer(
        calibrated, tmp_path):  # noqa: F811
    from readmoe.refactor.gram import compute_grams
    from readmoe.refactor.refit import refit_down_projections

    dense, tok, corpus, stats, _ = calibrated
    plan = make_planner("readme").plan(stats, keep=0.5)
    plain, _ = refit_down_projections(dense, plan, compute_grams(dense, tok, corpus, stats,
                                                                 tmp_path / "stats"))
    blocks = {d: stats.blocks(tok, corpus, d) for d in stats.domains}
    sequential, _ = sequential_refit(dense, plan, blocks)
    torch.testing.assert_close(sequential[0][0], plain[0][0], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(sequential[-1][0], plain[-1][0], rtol=1e-3, atol=1e-4)


def test_sequential_refit_refuses_experts_without_a_domain(calibrated):  # noqa: F811
    dense, tok, corpus, stats, _ = calibrated
    plan = make_planner("random").plan(stats, keep=0.5)
    blocks = {d: stats.blocks(tok, corpus, d) for d in stats.domains}
    with pytest.raises(ReadmoeError, match="named after"):
        sequential_refit(dense, plan, blocks)
    with pytest.raises(ReadmoeError, match="unknown refit target"):
        sequential_refit(dense, make_planner("readme").plan(stats, keep=0.5), blocks,
                         target="logits")


def test_refactor_cli_sequential_refit_writes_and_loads(tmp_path, tiny_llama_dir,
                                                        tiny_corpus_dir, capsys):
    from readmoe.cli import main
    from readmoe.model import ReadMEForCausalLM
    from readmoe.refactor.plan import ExpertPlan

    args = ["refactor", str(tiny_llama_dir), "--corpus", str(tiny_corpus_dir), "--tokens",
            "256", "--block-size", "32", "--stats", str(tmp_path / "stats")]
    assert main(args + ["--out", str(tmp_path / "seq"), "--refit", "--sequential",
                        "--compensate"]) == 0
    meta = ExpertPlan.load(tmp_path / "seq" / "plan").meta["down_refit"]
    assert (meta["sequential"], meta["bias"], meta["target"]) == (True, True, "ffn")
    assert not (tmp_path / "stats" / "gram").exists()  # no second moments needed on disk
    weights = load_file(str(tmp_path / "seq" / "model.safetensors"))
    loaded = ReadMEForCausalLM.from_pretrained(tmp_path / "seq")
    for key, value in loaded.state_dict().items():
        if key in weights:
            assert torch.equal(value, weights[key]), key
    capsys.readouterr()
    assert main(args + ["--out", str(tmp_path / "x"), "--sequential"]) == 2
    assert "add --refit" in capsys.readouterr().err
    assert main(args + ["--out", str(tmp_path / "x"), "--refit", "--sequential", "--method",
                        "random"]) == 2
    assert "have no domain" in capsys.readouterr().err
    assert main(args + ["--out", str(tmp_path / "x"), "--refit", "--refit-target",
                        "layer"]) == 2
    assert "add --sequential" in capsys.readouterr().err
    assert main(args + ["--out", str(tmp_path / "layer"), "--refit", "--sequential",
                        "--refit-target", "layer"]) == 0
    assert ExpertPlan.load(tmp_path / "layer" / "plan").meta["down_refit"]["target"] == "layer"
    assert not (tmp_path / "x").exists()
