"""benchmarks/step_ops.py: the ops a graphed decode step dispatches, views left out, and the
router's eager step counted apart."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
from step_ops import OpCount, count_step  # noqa: E402

from tests.server.helpers import save_tiny_model  # noqa: E402


def test_views_launch_nothing_and_each_other_op_counts_once():
    x, w = torch.randn(2, 3), torch.randn(3, 4)
    with OpCount() as count:
        (x @ w).relu().view(-1).transpose(0, 0)
    assert dict(count.ops) == {"mm": 1, "relu": 1}


def test_a_pregating_models_step_and_its_router_are_counted_apart(tmp_path):
    folder = save_tiny_model(tmp_path / "tiny")
    one, four = count_step(str(folder), 1), count_step(str(folder), 4)
    assert one["router_ops"] > 0 and one["graphed_ops"] > one["layers"]
    # the graph's ops do not grow with its rows (but for the CPU's LM head: x @ W for one
    # row, oneDNN's linear and a copy for more); building its inputs on the host does
    assert abs(four["graphed_ops"] - one["graphed_ops"]) <= 1
    assert four["host_ops"] > one["host_ops"]
    assert sum(one["graphed_by_op"].values()) == one["graphed_ops"]
