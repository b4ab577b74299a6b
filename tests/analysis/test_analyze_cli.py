"""`readmoe analyze` end to end on the tiny refactored model, and its refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from readmoe.cli import build_parser
from readmoe.errors import ReadmoeError
from readmoe.refactor.plan import ExpertPlan

FILES = ("analysis.json", "analysis.md", "transitions.png", "mi_per_layer.png",
         "reuse_distance.png", "domain_expert.png")
SMALL = ["--tokens", "128", "--block-size", "32", "--batch-size", "4"]


def analyze(*argv: str) -> int:
    """Run `readmoe analyze ...` through the real parser, letting ReadmoeError propagate."""
    args = build_parser().parse_args(["analyze", *argv])
    return args.handler(args)


def check_shares(values: list[float]) -> None:
    assert all(0.0 <= v <= 1.0 for v in values), values


def test_analyze_writes_every_output(tmp_path, pregating_dir, layerwise_dir, train_corpus_dir):
    out = tmp_path / "analysis"
    assert analyze(str(pregating_dir), "--corpus", str(train_corpus_dir), "--out", str(out),
                   "--layerwise", str(layerwise_dir), *SMALL) == 0
    for name in FILES:
        assert (out / name).stat().st_size > 0, name
    assert (out / "transitions.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(out.glob(".*.tmp"))
    result = json.loads((out / "analysis.json").read_text())
    assert result["tokens"] == 3 * 128 and result["block_size"] == 32
    assert result["domains"] == ["digits", "lower", "upper"]
    layers = result["routed_layers"]
    assert layers == [0, 1]
    for name in ("oracle", "layerwise"):
        block = result["layer_redundancy"][name]
        assert [p["layers"] for p in block["pairs"]] == [[0, 1]]
        pair = block["pairs"][0]
        assert 0.0 <= pair["mi_bits"] <= min(pair["entropy_bits"]) + 1e-9
        check_shares([pair["normalised_mi"], pair["best_successor_share"],
                      block["mean_normalised_mi"]])
        assert sum(map(sum, pair["counts"])) == result["tokens"]
    locality = result["temporal_locality"]
    assert locality["reference"]["Read-ME"]["share"] == pytest.approx(2921 / 4096)
    for name in ("pregating", "layerwise", "oracle", "oracle_per_layer"):
        check_shares([locality[name]["reuse_share"], locality[name]["iid_reuse_share"]])
        distances = locality[name]["reuse_distance"]
        assert sum(distances.values()) == pytest.approx(1.0)
        # every sequence's first token has no earlier use
        assert distances["never"] >= result["sequences"] / result["tokens"] - 1e-9
    assert len(locality["layerwise"]["per_layer_reuse_share"]) == len(layers)
    for name in ("pregating", "oracle"):
        block = result["domain_expert"][name]
        assert block["columns"] == ["digits", "lower", "upper"]
        for row in block["shares"]:
            check_shares(row)
            assert sum(row) == pytest.approx(1.0)
        check_shares([block["own_expert_share"]])
    check_shares([result["domain_expert"]["pregating"]["oracle_agreement"]])
    usage = result["expert_usage"]
    assert sum(usage["pregating"]["shares"]) == pytest.approx(1.0)
    assert len(usage["layerwise_per_layer"]) == len(layers)
    report = (out / "analysis.md").read_text()
    assert "## Layer-wise redundancy" in report and "paper: Read-ME | 71.3%" in report


def test_oracle_only_and_refusals(tmp_path, tiny_moe_dir, layerwise_dir, pregating_dir,
                                  tiny_llama_dir, train_corpus_dir):
    common = ["--corpus", str(train_corpus_dir), *SMALL]
    out = tmp_path / "oracle-only"
    assert analyze(str(tiny_moe_dir), "--out", str(out), *common) == 0
    result = json.loads((out / "analysis.json").read_text())
    assert result["router_type"] == "none"
    assert set(result["domain_expert"]) == {"oracle"}
    assert "pregating" not in result["temporal_locality"]
    assert (out / "reuse_distance.png").is_file()

    with pytest.raises(ReadmoeError, match="not a ReadME folder"):
        analyze(str(tiny_llama_dir), "--out", str(tmp_path / "x"), *common)
    with pytest.raises(ReadmoeError, match="layer-wise router; give"):
        analyze(str(layerwise_dir), "--out", str(tmp_path / "x"), *common)
    with pytest.raises(ReadmoeError, match="must be a ReadME model with a layer-wise router"):
        analyze(str(tiny_moe_dir), "--layerwise", str(pregating_dir), "--out",
                str(tmp_path / "x"), *common)
    other = tmp_path / "other-plan"
    shutil.copytree(layerwise_dir, other)
    plan = ExpertPlan.load(other / "plan")
    for layer in plan.layers:
        layer.experts = layer.experts[[1, 0, 2]].clone()  # experts 0 and 1 swapped
    plan.save(other / "plan")
    with pytest.raises(ReadmoeError, match="another plan"):
        analyze(str(pregating_dir), "--layerwise", str(other), "--out", str(tmp_path / "x"),
                *common)
    assert not (tmp_path / "x").exists()


def test_too_few_tokens_for_a_block_is_refused(tmp_path: Path):
    with pytest.raises(ReadmoeError, match="less than one block"):
        analyze(str(tmp_path), "--corpus", str(tmp_path), "--out", str(tmp_path / "o"),
                "--tokens", "16", "--block-size", "32")
