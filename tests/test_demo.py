"""The demo refuses to resume a training folder made with another budget, naming the fix."""

import pytest

from readmoe.demo import refuse_other_budget
from readmoe.errors import ReadmoeError
from readmoe.io import atomic_write_json
from readmoe.train.config import TrainConfig
from readmoe.train.rounds import STATE


def test_a_folder_trained_with_another_budget_is_refused_with_both_ways_on(tmp_path):
    old, new = TrainConfig(rounds=2, router_steps=10), TrainConfig(rounds=2, router_steps=40)
    refuse_other_budget(tmp_path / "absent", new)  # nothing trained yet: nothing to refuse
    atomic_write_json(tmp_path / STATE, {"config": old.to_dict()})
    refuse_other_budget(tmp_path, old)  # the same budget resumes
    with pytest.raises(ReadmoeError, match=r"router_steps 10 \(now 40\).*Delete"):
        refuse_other_budget(tmp_path, new)
