"""The dense baseline streamed through a budget: how the budget splits, what each step loads,
and exact tokens through the engine."""

from __future__ import annotations

import pytest

from readmoe.errors import ReadmoeError
from readmoe.refactor.pipeline import write_dense_experts
from readmoe.serve.engine import Engine
from readmoe.serve.experts.stream import DenseStream, StreamPlanner, split_budget, streamed_layers
from readmoe.serve.placement import place_for_offload
from readmoe.serve.sampling import SamplingParams
from tests.conftest import char_tokenizer


def test_the_budget_keeps_whole_layers_and_two_buffers():
    assert split_budget(4, 10, 40) == 4  # everything fits
    assert split_budget(4, 10, 39) == 1  # two buffers, then one whole layer
    assert split_budget(4, 10, 20) == 0
    with pytest.raises(ReadmoeError, match="two streaming buffers"):
        split_budget(4, 10, 19)
    assert streamed_layers(8, 4) == [1, 3, 5, 7]  # spread over the depth
    assert streamed_layers(8, 8) == [] and streamed_layers(3, 0) == [0, 1, 2]


def test_streamed_layers_load_every_step_into_two_buffers():
    planner = StreamPlanner(4, [0, 1, 2, 3], resident=1, expert_bytes=[10] * 4)
    assert planner.streamed == [0, 2, 3]
    for step in range(3):
        plan = planner.plan(step)
        loads = {layer: p.loads for layer, p in plan.layers.items()}
        assert [ld.slot for ld in loads[0] + loads[2] + loads[3]] == [0, 1, 0]
        assert loads[3][0].after == (0, 0)  # buffer 0 is free once layer 0 has computed
        assert loads[0][0].after is None and loads[2][0].after is None
        assert len(loads[1]) == (1 if step == 0 else 0)  # resident: a cold load only
    stats = planner.stats
    assert (stats.misses, stats.hits, stats.bytes_moved) == (10, 2, 100)


@pytest.fixture(scope="module")
def dense_folder(tmp_path_factory):
    from tests.conftest import tiny_model

    root = tmp_path_factory.mktemp("dense")
    model = tiny_model("llama", seed=3, num_hidden_layers=4)
    model.save_pretrained(root / "dense")
    char_tokenizer().save_pretrained(root / "dense")
    write_dense_experts(str(root / "dense"), root / "experts")
    return root / "experts"


@pytest.mark.parametrize("prefetch", [True, False])
def test_the_dense_stream_decodes_exactly_like_the_resident_model(dense_folder, prefetch):
    from readmoe.models import load_model

    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    resident = Engine(load_model(str(dense_folder)), char_tokenizer()).generate(prompts, params)
    model = load_model(str(dense_folder))
    place_for_offload(model)
    with DenseStream(dense_folder, 10**12) as probe:
        layer_bytes = probe.layer_bytes
        assert probe.streamed == [] and probe.fast_tier_bytes == 4 * layer_bytes
    with DenseStream(dense_folder, 3 * layer_bytes, bandwidth=1e9) as stream:
        assert stream.streamed == [0, 2, 3]  # one layer resident, two buffers for the rest
        got = Engine(model, char_tokenizer(), expert_store=stream, prefetch=prefetch
                     ).generate(prompts, params)
        stats = stream.stats
    assert [o.token_ids for o in got] == [o.token_ids for o in resident]
    assert stats.hits > 0 and stats.misses > 0 and stats.load_s > 0
    assert stats.bytes_moved == stats.misses * layer_bytes


def test_a_folder_with_several_experts_is_refused(tmp_path_factory):
    from tests.serve.helpers import saved_tiny_readme

    _, folder = saved_tiny_readme(tmp_path_factory, 1, "moe")
    with pytest.raises(ReadmoeError, match="one expert"):
        DenseStream(folder, 10**9)
