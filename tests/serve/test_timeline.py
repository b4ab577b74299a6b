"""The simulator's two streams on constructed plans: prefetch issues at the step's start, on
demand at each layer, loads wait for the compute they depend on, and the copy stream carries
over into the next step."""

import pytest

from readmoe.serve.cost import CostModel
from readmoe.serve.experts import LayerPlan, Load, StepPlan
from readmoe.serve.timeline import StreamClock, run_step

# a load takes 1 s; a layer's own work 0.5 s; each routed expert 0.1 s; 0.2 s per step besides
COST = CostModel(num_layers=2, expert_bytes=(10, 10), step_overhead_s=0.2, layer_fixed_s=0.5,
                 token_s=0.0, expert_s=0.1, load_bandwidth=10.0)


def _layers(*loads_per_layer):
    return {layer: LayerPlan(layer, layer, (0,), {0: 0}, tuple(loads))
            for layer, loads in enumerate(loads_per_layer)}


def test_prefetch_overlaps_loads_with_the_layers_before_them():
    layers = _layers([Load(0, 0, 0)], [Load(1, 0, 0)])
    end, spent, stall = run_step(StreamClock(), COST, StepPlan(0, layers), layers, 0.0, 1, True)
    # loads end at 1 and 2; layer 0 waits 0.5 (until 1), layer 1 waits 0.4 (1.6 -> 2)
    assert (end, spent, stall) == pytest.approx((2.3, 2.0, 0.9))


def test_on_demand_issues_each_layers_loads_when_it_is_reached():
    layers = _layers([Load(0, 0, 0)], [Load(1, 0, 0)])
    end, spent, stall = run_step(StreamClock(), COST, StepPlan(0, layers), layers, 0.0, 1, False)
    assert (end, spent, stall) == pytest.approx((3.4, 2.0, 2.0))


def test_a_load_waits_for_the_compute_it_overwrites():
    plan = {0: LayerPlan(0, 0, (0, 1), {0: 0, 1: 0}, (Load(0, 1, 0, after=(0, 0)),))}
    end, _, stall = run_step(StreamClock(), COST, StepPlan(0, plan), plan, 0.0, 1, True)
    # expert 0 computes 0.5 -> 0.6; the load of 1 runs 0.6 -> 1.6; 1 computes to 1.7
    assert stall == pytest.approx(1.0)
    assert end == pytest.approx(1.7 + 0.5 + 0.2)


def test_speculative_loads_run_on_into_the_next_step_and_are_waited_for_there():
    clock = StreamClock()
    layers = _layers([], [])
    ahead = StepPlan(0, layers, (Load(0, 3, 0), Load(1, 3, 0)))
    end, spent, stall = run_step(clock, COST, ahead, layers, 0.0, 1, True)
    assert (end, stall) == pytest.approx((1.4, 0.0)) and spent == pytest.approx(2.0)
    assert clock.copy_free == pytest.approx(2.0)  # beyond the step's end
    hits = {layer: LayerPlan(layer, 2 + layer, (3,), {3: 0}, ()) for layer in (0, 1)}
    end, _, stall = run_step(clock, COST, StepPlan(1, hits), hits, end, 1, True)
    # layer 0 needs 3 at 1.9 (ready at 1): no wait; layer 1 at 2.5 (ready at 2): no wait
    assert stall == pytest.approx(0.0) and end == pytest.approx(1.4 + 1.2 + 0.2)
