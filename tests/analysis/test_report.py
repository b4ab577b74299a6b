"""The report on constructed routing choices: known answers, no model needed."""

from __future__ import annotations

import json

import numpy as np
import pytest

from readmoe.analysis.collect import RoutingChoices
from readmoe.analysis.report import write_analysis


def choices(layers: int, seed: int = 0) -> RoutingChoices:
    """Four sequences of 40 tokens, two domains; every layer copies the summed label, and the
    pre-gating router sends each domain to its own expert."""
    rng = np.random.default_rng(seed)
    domain = np.repeat([[0], [0], [1], [1]], 40, axis=1)
    oracle = rng.integers(0, 3, (4, 40))
    return RoutingChoices(["a", "b", "c"], ["a", "b"], list(range(layers)), domain,
                          np.repeat(oracle[..., None], layers, axis=2), oracle, domain.copy(),
                          None)


def test_copied_layers_are_fully_redundant_and_domains_match(tmp_path):
    result = write_analysis(choices(layers=3), tmp_path, {"model": "synthetic"})
    oracle = result["layer_redundancy"]["oracle"]
    assert [p["layers"] for p in oracle["pairs"]] == [[0, 1], [1, 2]]
    assert oracle["mean_normalised_mi"] == pytest.approx(1.0)
    assert oracle["mean_best_successor_share"] == 1.0
    locality = result["temporal_locality"]
    assert locality["pregating"]["reuse_share"] == 1.0  # one expert per sequence
    assert locality["pregating"]["reuse_distance"]["never"] == pytest.approx(4 / 160)
    assert locality["oracle_per_layer"]["reuse_share"] == pytest.approx(
        locality["oracle"]["reuse_share"])
    pregating = result["domain_expert"]["pregating"]
    assert pregating["shares"] == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    assert pregating["own_expert_share"] == 1.0
    assert result["expert_usage"]["pregating"]["shares"] == [0.5, 0.5, 0.0]
    assert json.loads((tmp_path / "analysis.json").read_text()) == result


def test_a_single_routed_layer_has_no_pairs_but_still_reports(tmp_path):
    result = write_analysis(choices(layers=1), tmp_path, {"model": "synthetic"})
    assert result["layer_redundancy"]["oracle"]["pairs"] == []
    assert result["layer_redundancy"]["oracle"]["mean_normalised_mi"] is None
    assert "single routed layer" in (tmp_path / "analysis.md").read_text()
    for name in ("transitions.png", "mi_per_layer.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
