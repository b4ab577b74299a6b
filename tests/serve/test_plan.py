"""The step planner: one plan per step for every routed layer, predicted uses where the known
future ends, and next-step prefetches chosen from the predicted demand."""

import pytest

from readmoe.errors import ReadmoeError
from readmoe.serve.experts import CoDesign, ExpertCache, ExpertPlanner, make_policy
from readmoe.serve.types import Batch, Chunk, Request, RequestState


def _decoding(request_id, expert, max_tokens=9):
    """A request whose last known token (expert ``expert``) is processed this step."""
    return Request(request_id, 0.0, [expert], max_tokens, num_computed=1,
                   state=RequestState.RUNNING)


def _planner(codesign, capacity=2):
    cache = ExpertCache(capacity, [8, 8, 0], make_policy("belady"))  # layer 2: no routed experts
    return ExpertPlanner(cache, 3, [0, 1], codesign), cache


def test_a_plan_covers_every_routed_layer_at_its_time():
    planner, cache = _planner(CoDesign())
    batch = Batch((Chunk("a", 0, (0, 1), True, True),))
    plan = planner.plan(4, batch, [], 8)
    assert set(plan.layers) == {0, 1} and plan.speculative == ()
    assert [plan.layers[layer].time for layer in (0, 1)] == [12, 13]
    assert planner.view().resident == {0, 1} and planner.view().capacity == 2
    assert cache.stats.misses == 4


def test_the_next_step_prefetch_swaps_in_the_most_wanted_expert():
    planner, cache = _planner(CoDesign("last", prefetch_rate=1))
    ending, going_on = _decoding("end", 0, max_tokens=1), _decoding("on", 1)
    waiting = [Request(f"w{i}", 1.0, [2, 2], 4) for i in range(2)]
    batch = Batch((Chunk("end", 0, (0,), True, True), Chunk("on", 0, (1,), True, True)))
    plan = planner.plan(0, batch, [ending, going_on, *waiting], 8)
    # demand next step: expert 1 by one request (predicted), expert 2 by two (known), expert 0
    # by none (its request ends): 2 comes in over 0, after 0 has computed in each layer
    assert [(ld.layer, ld.expert) for ld in plan.speculative] == [(0, 2), (1, 2)]
    for load in plan.speculative:
        order = plan.layers[load.layer].order
        assert load.speculative and load.after == (load.layer, order.index(0))
        assert load.slot == plan.layers[load.layer].slots[0]
    assert planner.view().resident == {1, 2}
    assert (cache.stats.prefetched, cache.stats.misses) == (2, 4)


def test_no_swap_when_the_victim_is_wanted_as_much():
    planner, cache = _planner(CoDesign("last", prefetch_rate=1))
    batch = Batch((Chunk("a", 0, (0,), True, True), Chunk("b", 0, (1,), True, True)))
    queued = [_decoding("a", 0), _decoding("b", 1), Request("w", 1.0, [2], 4)]
    plan = planner.plan(0, batch, queued, 8)
    assert plan.speculative == () and cache.stats.prefetched == 0


def test_free_slots_take_prefetches_without_evicting():
    planner, cache = _planner(CoDesign("last", prefetch_rate=2), capacity=3)
    batch = Batch((Chunk("a", 0, (0,), True, True),))
    queued = [_decoding("a", 0), Request("w", 1.0, [4], 4), Request("v", 1.0, [4], 4)]
    plan = planner.plan(0, batch, queued, 8)
    assert {(ld.expert, ld.after) for ld in plan.speculative} == {(4, None)}
    assert cache.resident(0) == {0, 4} and cache.stats.evictions == 0


def test_predictions_skip_requests_that_sample_their_last_token():
    planner, _ = _planner(CoDesign("last"))
    ending, going_on = _decoding("end", 3, max_tokens=1), _decoding("on", 5)
    waiting = Request("w", 1.0, [1], 4)
    assert planner.predictions([ending, going_on, waiting]) == {"on": 5}
    assert _planner(CoDesign())[0].predictions([going_on]) == {}


def test_codesign_options_are_checked():
    with pytest.raises(ReadmoeError, match="predictor"):
        CoDesign(prefetch_rate=1)
    with pytest.raises(ReadmoeError, match=">= 0"):
        CoDesign("last", -1)
    with pytest.raises(ReadmoeError, match="unknown predictor"):
        CoDesign("oracle")


def test_prefetches_are_paced_to_the_copy_streams_rate():
    planner, cache = _planner(CoDesign("last", prefetch_rate=0.5))
    for step in range(4):
        waiting = [Request(f"w{step}-{i}", 1.0, [2 + step % 2], 4) for i in range(2)]
        batch = Batch((Chunk(f"a{step}", 0, (0,), True, True),
                       Chunk(f"b{step}", 0, (1,), True, True)))
        plan = planner.plan(step, batch, waiting, 8)
        # credit 0.5 a step: a prefetch (two layers) every other step
        assert len(plan.speculative) == (2 if step % 2 else 0), step
