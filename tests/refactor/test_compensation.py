"""Compensation biases (issue 13, item 1): a compensated FFN equals the dense FFN with the
dropped channels masked out plus the same bias; the bias is the mean output the dropped
channels had on the calibration tokens; save and load keep it exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from readmoe.data.corpus import load_corpus
from readmoe.data.tokens import pack_blocks
from readmoe.errors import ReadmoeError
from readmoe.model import ReadMEForCausalLM
from readmoe.model.experts import ExpertGroups
from readmoe.refactor.compensation import compensation_biases
from readmoe.refactor.planners import make_planner
from readmoe.refactor.slicing import save_readme, slice_dense
from readmoe.refactor.stats import compute_stats
from tests.conftest import char_tokenizer, mlp_inputs
from tests.refactor.test_slicing import DENSE, dense_model, random_plan, sample_ids


def random_biases(plan, hidden: int = 64, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(plan.num_experts if lp.expert_size else 1, hidden, generator=gen)
            for lp in plan.layers]


def masked_ffn(mlp: nn.Module, lp, bias: torch.Tensor, x: torch.Tensor,
               expert_ids: torch.Tensor) -> torch.Tensor:
    """The full dense FFN one token at a time, kept channels only, plus the token's bias."""
    out = torch.empty_like(x)
    for row in range(x.shape[0]):
        expert = int(expert_ids[row])
        mask = torch.zeros(DENSE)
        mask[lp.shared] = 1.0
        if lp.expert_size:
            mask[lp.experts[expert]] = 1.0
        token = x[row]
        hidden = mlp.act_fn(mlp.gate_proj(token)) * mlp.up_proj(token)
        out[row] = mlp.down_proj(hidden * mask) + bias[expert if lp.expert_size else 0]
    return out


@torch.no_grad()
def test_compensated_ffn_equals_masked_dense_plus_bias():
    dense = dense_model("llama")
    plan = random_plan(2, shared_sizes=[32, 48], expert_sizes=[24, 0], num_experts=3)
    biases = random_biases(plan)
    model = slice_dense(dense, plan, biases)
    assert model.config.compensation
    x = torch.randn(12, 64)
    expert_ids = torch.randint(0, 3, (12,))
    groups = ExpertGroups.from_expert_ids(expert_ids, 3)
    for index, lp in enumerate(plan.layers):
        got = model.model.layers[index].mlp(x[None], groups)[0]
        want = masked_ffn(dense.model.layers[index].mlp, lp, biases[index], x, expert_ids)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        plain = slice_dense(dense, plan).model.layers[index].mlp(x[None], groups)[0]
        assert (got - plain).abs().max() > 0.5  # the bias is really added


@torch.no_grad()
def test_biases_are_the_dropped_channels_mean_output_on_the_calibration_tokens(
        tmp_path, tiny_corpus_dir):
    """Fed the dense model's own FFN inputs, the compensated FFN's mean error over exactly
    the statistics' tokens of each domain is zero; without the bias it is not."""
    dense, tok = dense_model("llama"), char_tokenizer()
    corpus = load_corpus(tiny_corpus_dir)
    stats = compute_stats(dense, tok, corpus, tmp_path / "stats", model_name="tiny",
                          fingerprint="f", tokens_per_domain=128, block_size=32)
    for method in ("readme", "prune"):
        plan = make_planner(method).plan(stats, keep=0.5)
        model = slice_dense(dense, plan, compensation_biases(dense, plan, stats))
        total = torch.zeros(len(plan.layers), 64, dtype=torch.float64)
        for expert, domain in enumerate(stats.domains):
            blocks = pack_blocks(tok, corpus.documents(domain, "train"), 32, 128)
            inputs = mlp_inputs(dense, blocks)
            ids = torch.full(blocks.shape, expert if method == "readme" else 0)
            groups = ExpertGroups.from_expert_ids(ids, plan.num_experts)
            for index, layer in enumerate(model.model.layers):
                x = inputs[index]
                error = (dense.model.layers[index].mlp(x) - layer.mlp(x, groups)).double()
                total[index] += error.sum(dim=(0, 1))
                if method == "readme":  # each expert's bias is measured on its own domain
                    torch.testing.assert_close(error.mean(dim=(0, 1)).float(), torch.zeros(64),
                                               rtol=0, atol=1e-5)
                    bias = layer.mlp.compensation[expert]
                    assert (error + bias).mean(dim=(0, 1)).abs().max() > 1e-3
        if method == "prune":  # one bias per layer, measured on all domains together
            mean = (total / (128 * len(stats.domains))).float()
            torch.testing.assert_close(mean, torch.zeros_like(mean), rtol=0, atol=1e-5)
            assert model.model.layers[0].mlp.compensation.abs().max() > 1e-3


def test_save_and_load_keep_the_bias_exactly(tmp_path):
    dense = dense_model("llama")
    plan = random_plan(3, shared_sizes=[32, 48], expert_sizes=[24, 0], num_experts=3)
    model = slice_dense(dense, plan, random_biases(plan, seed=1))
    save_readme(model, tmp_path / "moe", tokenizer=char_tokenizer(), plan=plan)
    loaded = ReadMEForCausalLM.from_pretrained(tmp_path / "moe").eval()
    assert loaded.config.compensation
    for index in range(2):
        a = model.model.layers[index].mlp.compensation
        b = loaded.model.layers[index].mlp.compensation
        assert a.shape == b.shape and torch.equal(a, b)
    input_ids, expert_ids = sample_ids(3)
    with torch.no_grad():
        assert torch.equal(model(input_ids, expert_ids=expert_ids).logits,
                           loaded(input_ids, expert_ids=expert_ids).logits)


def test_stats_without_signed_means_are_refused_for_compensation(tmp_path, tiny_corpus_dir):
    dense, tok = dense_model("llama"), char_tokenizer()
    stats = compute_stats(dense, tok, load_corpus(tiny_corpus_dir), tmp_path, model_name="t",
                          fingerprint="f", tokens_per_domain=64, block_size=32)
    stats.mean.clear()  # as a folder written before signed means were recorded
    plan = make_planner("readme").plan(stats, keep=0.5)
    with pytest.raises(ReadmoeError, match="--recompute-stats"):
        compensation_biases(dense, plan, stats)


def test_refactor_cli_compensate_writes_a_compensated_folder(tmp_path, tiny_llama_dir,
                                                             tiny_corpus_dir):
    from readmoe.cli import main
    from readmoe.models import load_model

    out = tmp_path / "moe"
    assert main(["refactor", str(tiny_llama_dir), "--corpus", str(tiny_corpus_dir), "--out",
                 str(out), "--tokens", "256", "--block-size", "32", "--compensate"]) == 0
    model = load_model(str(out))
    assert model.config.compensation
    assert model.model.layers[0].mlp.compensation.abs().max() > 0
