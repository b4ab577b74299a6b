from __future__ import annotations

import pytest
import torch

from readmoe.data.corpus import load_corpus
from readmoe.data.tokens import pack_blocks
from readmoe.errors import ReadmoeError
from readmoe.refactor.hooks import down_projections
from readmoe.refactor.stats import ActivationStats, compute_stats, domain_means
from tests.conftest import char_tokenizer, mlp_inputs, tiny_model


def naive_means(model, blocks):
    """Recompute each layer's down_proj input from the MLP's own input and weights."""
    inputs = mlp_inputs(model, blocks)
    rows = []
    for index, layer in enumerate(model.model.layers):
        hidden = inputs[index]
        act = torch.nn.functional.silu(layer.mlp.gate_proj(hidden)) * layer.mlp.up_proj(hidden)
        rows.append(torch.stack([act.abs().mean(dim=(0, 1)), (act * act).mean(dim=(0, 1)),
                                 act.mean(dim=(0, 1))]))
    return torch.stack(rows)  # [L, 3, I]


def test_domain_means_equal_manual_recompute():
    model = tiny_model()
    blocks = torch.randint(0, 128, (3, 16))
    with torch.no_grad():
        expected = naive_means(model, blocks)
        mean_abs, mean_sq, mean = domain_means(model, blocks, batch_size=2, desc="t")
    torch.testing.assert_close(mean_abs, expected[:, 0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mean_sq, expected[:, 1], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(mean, expected[:, 2], rtol=1e-5, atol=1e-6)
    assert (mean.abs() <= mean_abs + 1e-6).all() and (mean < 0).any()
    assert (mean_abs.square() <= mean_sq + 1e-6).all()  # Jensen: E|a|^2 <= E[a^2]
    assert all(not m._forward_pre_hooks for m in down_projections(model))


def test_compute_stats_saves_loads_and_resumes(tmp_path, tiny_corpus_dir, monkeypatch):
    model, tok = tiny_model(), char_tokenizer()
    corpus = load_corpus(tiny_corpus_dir)
    out = tmp_path / "stats"
    full = compute_stats(model, tok, corpus, out, model_name="tiny", fingerprint="f1",
                         tokens_per_domain=256, block_size=32)
    assert full.domains == ["digits", "lower", "upper"]
    assert full.mean_abs["digits"].shape == (2, 128)
    assert full.tokens["digits"] == 256
    loaded = ActivationStats.load(out)
    for d in full.domains:
        torch.testing.assert_close(loaded.mean_abs[d], full.mean_abs[d])
        torch.testing.assert_close(loaded.mean[d], full.mean[d])
        torch.testing.assert_close(loaded.mean_sq[d], full.mean_sq[d])

    # a run killed after the first domain resumes without recomputing it
    partial = tmp_path / "partial"
    compute_stats(model, tok, corpus, partial, model_name="tiny", fingerprint="f1",
                  tokens_per_domain=256, block_size=32, domains=["digits"])
    seen = []
    import readmoe.refactor.stats as stats_module

    real = stats_module.domain_means
    monkeypatch.setattr(stats_module, "domain_means",
                        lambda m, b, bs, desc: seen.append(desc) or real(m, b, bs, desc))
    resumed = compute_stats(model, tok, corpus, partial, model_name="tiny", fingerprint="f1",
                            tokens_per_domain=256, block_size=32)
    assert seen == ["stats lower", "stats upper"]
    for d in full.domains:
        torch.testing.assert_close(resumed.mean_abs[d], full.mean_abs[d])


def test_resume_refuses_other_inputs(tmp_path, tiny_corpus_dir):
    model, tok = tiny_model(), char_tokenizer()
    corpus = load_corpus(tiny_corpus_dir)
    compute_stats(model, tok, corpus, tmp_path, model_name="tiny", fingerprint="f1",
                  tokens_per_domain=64, block_size=32, domains=["digits"])
    with pytest.raises(ReadmoeError, match="computed on model 'tiny'"):
        compute_stats(model, tok, corpus, tmp_path, model_name="tiny", fingerprint="f2",
                      tokens_per_domain=64, block_size=32)
    with pytest.raises(ReadmoeError, match="block size"):
        compute_stats(model, tok, corpus, tmp_path, model_name="tiny", fingerprint="f1",
                      tokens_per_domain=64, block_size=16)


def test_check_inputs_names_the_mismatch_and_skips_none(tmp_path, tiny_corpus_dir):
    model, tok = tiny_model(), char_tokenizer()
    corpus = load_corpus(tiny_corpus_dir)
    stats = compute_stats(model, tok, corpus, tmp_path, model_name="a", fingerprint="f1",
                          tokens_per_domain=64, block_size=32)
    stats.check_inputs(tmp_path, fingerprint="f1", corpus_fingerprint=corpus.fingerprint(),
                       tokens_requested=None, block_size=None)
    with pytest.raises(ReadmoeError, match=r"token count \(--tokens\) 64, not 128"):
        stats.check_inputs(tmp_path, tokens_requested=128)
    with pytest.raises(ReadmoeError, match="on corpus .*--recompute-stats"):
        stats.check_inputs(tmp_path, corpus_fingerprint="other")


def test_pack_is_deterministic_for_stats(tiny_corpus_dir):
    tok = char_tokenizer()
    corpus = load_corpus(tiny_corpus_dir)
    a = pack_blocks(tok, corpus.documents("lower", "train"), 32, 256)
    b = pack_blocks(tok, corpus.documents("lower", "train"), 32, 256)
    assert torch.equal(a, b)
