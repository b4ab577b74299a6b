"""The refactor stage end to end through the CLI, on a tiny model and corpus."""

from __future__ import annotations

import json

import pytest
import torch

from readmoe.cli import main
from readmoe.refactor.plan import ExpertPlan
from tests.conftest import refactor_tiny


@pytest.fixture
def refactored(tmp_path, tiny_llama_dir, tiny_corpus_dir):
    return refactor_tiny(tmp_path, tiny_llama_dir, tiny_corpus_dir)


def test_refactor_writes_a_loadable_readme_folder(refactored, tiny_llama_dir):
    from readmoe.models import load_model, model_info

    plan = ExpertPlan.load(refactored / "plan")
    assert plan.expert_names == ["digits", "lower", "upper"]
    model = load_model(str(refactored))
    assert model.config.model_type == "readme"
    assert model.config.expert_intermediate_sizes == [lp.expert_size for lp in plan.layers]
    info = model_info(str(refactored))
    dense = model_info(str(tiny_llama_dir))
    assert info["layers"] == dense["layers"]
    ids = torch.randint(0, 100, (1, 8))
    assert model(ids, expert_ids=torch.tensor([1])).logits.shape == (1, 8, 128)


@pytest.mark.parametrize("routing", ["domain", "oracle"])
def test_eval_ppl_routes_readme_models(refactored, tiny_corpus_dir, tmp_path, routing):
    report_path = tmp_path / f"{routing}.json"
    assert main(["eval", "ppl", str(refactored), "--corpus", str(tiny_corpus_dir), "--tokens",
                 "64", "--window", "32", "--routing", routing, "--json",
                 str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["routing"] == routing
    assert set(report["domains"]) == {"digits", "lower", "upper"}
    assert all(entry["ppl"] > 1 for entry in report["domains"].values())


def test_router_routing_without_a_router_is_a_clear_error(refactored, tiny_corpus_dir, capsys):
    code = main(["eval", "ppl", str(refactored), "--corpus", str(tiny_corpus_dir), "--tokens",
                 "64", "--window", "32"])
    assert code == 2
    assert "has no router yet" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["cluster", "random", "prune"])
def test_every_method_refactors(tmp_path, tiny_llama_dir, tiny_corpus_dir, method):
    stats = tmp_path / "stats"
    main(["stats", str(tiny_llama_dir), "--corpus", str(tiny_corpus_dir), "--out", str(stats),
          "--tokens", "256", "--block-size", "32"])
    out = tmp_path / method
    assert main(["refactor", str(tiny_llama_dir), "--corpus", str(tiny_corpus_dir), "--out",
                 str(out), "--method", method, "--stats", str(stats)]) == 0
    plan = ExpertPlan.load(out / "plan")
    assert plan.method == method


def test_stats_from_another_model_are_refused(tmp_path, tiny_llama_dir, tiny_corpus_dir,
                                              capsys):
    from tests.conftest import char_tokenizer, tiny_model

    other = tmp_path / "other"
    tiny_model(seed=1).save_pretrained(other)
    char_tokenizer().save_pretrained(other)
    stats = tmp_path / "stats"
    main(["stats", str(other), "--corpus", str(tiny_corpus_dir), "--out", str(stats),
          "--tokens", "256", "--block-size", "32"])
    code = main(["refactor", str(tiny_llama_dir), "--corpus", str(tiny_corpus_dir), "--out",
                 str(tmp_path / "moe"), "--stats", str(stats)])
    assert code == 2
    assert "recompute them" in capsys.readouterr().err
