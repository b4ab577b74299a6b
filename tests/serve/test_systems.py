"""The compared serving systems: what each may use, budgets as capacities, and one run of
each ReadME system on the engine and the simulator from the same definition."""

from __future__ import annotations

import pytest

from readmoe.errors import ReadmoeError
from readmoe.serve.cost import CostModel
from readmoe.serve.engine import Engine
from readmoe.serve.experts import CoDesign
from readmoe.serve.placement import place_for_offload, routed_expert_bytes
from readmoe.serve.sim import simulate
from readmoe.serve.systems import (
    SYSTEMS,
    Setting,
    calibrate,
    capacity_for,
    make_settings,
    make_system,
    run_engine,
    sim_config,
    speculation_pays,
)
from readmoe.serve.traces import ReplayRouting
from readmoe.serve.types import Budget
from readmoe.serve.workload import Prompt, RequestSpec
from tests.conftest import char_tokenizer
from tests.serve.test_engine import readme

SETTING = Setting("link", "ram", 1e9, load_ratio=0.5, prefetch_rate=2.0)
BUDGET = Budget(16, 4)


def test_what_each_system_may_use():
    codesign = make_system("readme-codesign", SETTING, "last")
    assert (codesign.scheduler, codesign.policy, codesign.prefetch) == ("cache-aware", "belady",
                                                                        True)
    assert codesign.codesign.prefetch_rate == 2.0 and codesign.scheduler_options == {
        "load_ratio": 0.5}
    on_demand = make_system("readme-codesign-on-demand", SETTING)
    assert not on_demand.prefetch and on_demand.codesign.prefetch_rate == 0
    for name in ("readme-lru", "layerwise-lru"):
        system = make_system(name, SETTING)
        assert (system.scheduler, system.policy, system.prefetch) == ("fcfs", "lru", False)
        assert system.codesign.predictor is None
    assert [make_system(n, SETTING).model for n in SYSTEMS] == [
        "readme", "readme", "readme", "layerwise", "dense"]
    with pytest.raises(ReadmoeError, match="unknown system"):
        make_system("vllm", SETTING)


def test_speculation_only_where_the_steps_own_loads_cannot_hide_every_miss():
    ram = Setting("ram", "ram", None, load_ratio=0.07, prefetch_rate=14.3)
    assert not speculation_pays(ram, 2, 6)  # 4 misses * 0.07 fit in one step's compute
    assert speculation_pays(SETTING, 2, 6) and not speculation_pays(SETTING, 4, 6)
    assert not speculation_pays(SETTING, 6, 6)  # nothing is ever missing
    off = make_system("readme-codesign", ram, "last", capacity=2, num_experts=6)
    assert off.prefetch and off.codesign == CoDesign("last", 0.0)
    on = make_system("readme-codesign", SETTING, "last", capacity=2, num_experts=6)
    assert on.codesign == CoDesign("last", 2.0)


def test_budgets_become_capacities_and_settings_follow_the_calibration():
    assert [capacity_for(s, 6) for s in (0.33, 0.5, 0.67, 1.0)] == [2, 3, 4, 6]
    assert capacity_for(0.01, 6) == 1
    with pytest.raises(ReadmoeError, match="share"):
        capacity_for(0.0, 6)
    calibration = {"step_s": 0.1, "layers": 10, "expert_bytes": 1000, "ram_copy_s": 1e-4,
                   "link_bandwidth": 1e5}
    settings = make_settings(calibration, ["ram", "link"])
    assert settings["ram"].bandwidth is None and settings["ram"].load_ratio == pytest.approx(0.01)
    # link: each expert-layer load takes 10 ms + the copy, a layer's compute is 10 ms
    assert settings["link"].load_ratio == pytest.approx(1.01)
    assert settings["link"].prefetch_rate == pytest.approx(1 / 1.01, abs=1e-3)
    with pytest.raises(ReadmoeError, match="unknown setting"):
        make_settings(calibration, ["nvme"])


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model = readme()
    folder = tmp_path_factory.mktemp("systems") / "model"
    model.save_pretrained(folder)
    specs = [RequestSpec(f"r{i}", 0.01 * i, Prompt(n, tokens=tuple(range(5, 5 + n))), 5)
             for i, n in enumerate((6, 9, 4, 12))]
    return model, folder, specs


@pytest.mark.parametrize("name", ["readme-codesign", "readme-codesign-on-demand", "readme-lru"])
def test_each_readme_system_serves_on_the_engine_and_in_the_simulator(served, name):
    model, folder, specs = served
    offloaded = readme()
    place_for_offload(offloaded)
    routed = routed_expert_bytes(model)
    system = make_system(name, SETTING, "last")
    metrics = run_engine(system, offloaded, char_tokenizer(), str(folder), specs=specs,
                         share=0.5, setting=SETTING, routed_bytes=routed, budget=BUDGET,
                         kv_blocks=40, block_size=4)
    assert metrics["requests"] == len(specs) and len(metrics["steps_detail"]) == metrics["steps"]
    assert metrics["fast_tier_bytes"] == routed * 2 // 3  # round(0.5 * 3) = 2 of 3 experts
    cost = CostModel(num_layers=3, expert_bytes=(1000, 1000, 0), step_overhead_s=1e-3,
                     layer_fixed_s=1e-3, token_s=1e-4, expert_s=5e-4, load_bandwidth=1e6)
    config = sim_config(system, 0.5, SETTING, cost, model.config.num_experts, BUDGET, routed)
    routing = ReplayRouting([(s.prompt.length, [0] * (s.prompt.length + 5)) for s in specs])
    zero = [RequestSpec(s.request_id, s.arrival_time, Prompt(s.prompt.length,
                        experts=(0,) * s.prompt.length), 5) for s in specs]
    assert len(simulate(zero, routing, config).requests) == len(specs)


def test_calibration_measures_the_resident_engine(served):
    model, folder, specs = served
    calibration = calibrate(model, char_tokenizer(), folder, specs, BUDGET, kv_blocks=40)
    assert calibration["layers"] == 3 and calibration["step_s"] > 0
    assert calibration["link_bandwidth"] == pytest.approx(
        calibration["expert_bytes"] * 3 / calibration["step_s"])
    assert Engine(model, char_tokenizer()).planner is None  # resident: nothing to plan
