import math
import random

import pytest

from readmoe.errors import ReadmoeError
from readmoe.serve.queue import RequestQueue
from readmoe.serve.schedulers import SCHEDULERS, make_scheduler
from readmoe.serve.types import Batch, Budget, Chunk, Request, RequestState

from .helpers import markov_requests, planned, serve


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_budget_kept_and_every_request_finishes_once_with_max_tokens(name):
    for seed in range(12):
        rng = random.Random(seed)
        budget = Budget(max_tokens=rng.randint(1, 24), max_seqs=rng.randint(1, 8))
        plan = markov_requests(25, seed, spread=15)
        trace = serve(plan, make_scheduler(name), budget)
        for batch in trace.batches:
            assert 0 < batch.num_tokens <= budget.max_tokens
            assert batch.num_seqs <= budget.max_seqs
            assert len({c.request_id for c in batch.chunks}) == batch.num_seqs
        finished = trace.queue.finished
        assert sorted(r.request_id for r in finished) == sorted(p.request_id for p in plan)
        by_id = {p.request_id: p for p in plan}
        for request in finished:
            p = by_id[request.request_id]
            assert request.state is RequestState.FINISHED
            assert request.num_output == p.max_tokens
            assert request.num_computed == p.prompt_len + p.max_tokens - 1
        assert not trace.queue.waiting and not trace.queue.running


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_chunks_are_contiguous_and_carry_their_experts(name):
    plan = markov_requests(15, 3, max_prompt=30)
    truth = {p.request_id: p.experts for p in plan}
    next_position = {p.request_id: 0 for p in plan}
    for batch in serve(plan, make_scheduler(name), Budget(7, 4)).batches:
        for chunk in batch.chunks:
            assert chunk.start == next_position[chunk.request_id]
            end = chunk.start + chunk.num_tokens
            assert list(chunk.experts) == truth[chunk.request_id][chunk.start:end]
            next_position[chunk.request_id] = end


def test_decode_first_and_prefill_first_orders():
    queue = RequestQueue()
    old = Request("old", 0.0, [1, 1], 5)
    queue.add(old)
    queue.schedule(make_scheduler("fcfs"), Budget(8, 8))
    queue.complete(Batch((Chunk("old", 0, (1, 1), True, True),)), {"old": 2}, 1.0)
    queue.add(Request("new", 1.0, [3, 3, 3, 3], 5))
    budget = Budget(max_tokens=3, max_seqs=8)
    decode_first = make_scheduler("decode-first").schedule(queue.waiting, queue.running, budget)
    assert [(c.request_id, c.num_tokens, c.is_prefill) for c in decode_first.chunks] == [
        ("old", 1, False), ("new", 2, True)]
    prefill_first = make_scheduler("prefill-first").schedule(queue.waiting, queue.running, budget)
    assert [(c.request_id, c.num_tokens) for c in prefill_first.chunks] == [("new", 3)]


def test_expert_aware_takes_longest_queue_and_crosses_runs_of_chosen_experts():
    waiting = [Request("a", 0.0, [5, 5, 5, 2, 5], 3), Request("b", 0.1, [2], 3),
               Request("c", 0.2, [7, 7], 3), Request("d", 0.3, [2, 2, 7], 3)]
    batch = make_scheduler("expert-aware").schedule(waiting, [], Budget(8, 8))
    # queues: 5 -> 3 (a), 2 -> 3 (b, d), 7 -> 2 (c); ties go to the oldest request's queue:
    # 5 first: a takes [5, 5, 5]; then 2: b, d's [2, 2], and a crosses its [2] then [5] (chosen)
    assert {c.request_id: c.experts for c in batch.chunks} == {
        "a": (5, 5, 5, 2, 5), "b": (2,), "d": (2, 2)}
    assert batch.experts == (2, 5)


def test_expert_aware_cuts_a_run_that_does_not_fit_then_stops():
    waiting = [Request("a", 0.0, [1] * 6, 2), Request("b", 0.1, [2] * 2, 2)]
    batch = make_scheduler("expert-aware").schedule(waiting, [], Budget(4, 8))
    assert [(c.request_id, c.experts) for c in batch.chunks] == [("a", (1, 1, 1, 1))]


def test_expert_aware_has_fewer_distinct_experts_than_fcfs_under_locality():
    plan = markov_requests(64, 11, max_prompt=6, max_output=40, spread=20)
    budget = Budget(max_tokens=16, max_seqs=16)
    distinct = {}
    for name in ("fcfs", "expert-aware"):
        batches = serve(plan, make_scheduler(name), budget).batches
        distinct[name] = sum(len(b.experts) for b in batches) / len(batches)
    assert distinct["expert-aware"] < 0.75 * distinct["fcfs"], distinct


def _adversarial(rare_prompt):
    """Many requests always on expert 0, newcomers every step, one request on a rare expert."""
    plan = [planned(f"f{i}", i // 2, [0], [0] * 39) for i in range(80)]
    plan.append(planned("rare", 3, rare_prompt, [7] * 39))
    return plan


@pytest.mark.parametrize("name", ["expert-aware", "cache-aware"])
def test_aging_bound_for_one_token_chunks(name):
    budget, max_wait = Budget(max_tokens=6, max_seqs=6), 4
    plan = _adversarial([7])
    trace = serve(plan, make_scheduler(name, max_wait=max_wait), budget, capacity=2)
    capacity = min(budget.max_seqs, budget.max_tokens)
    bound = max_wait + math.ceil((trace.max_ready - 1) / capacity)
    assert trace.max_wait_seen <= bound
    # the longest-queue rule alone starves the rare request while expert 0's queue is long
    starved = serve(plan, make_scheduler(name, max_wait=10_000), budget, capacity=2)
    assert starved.max_wait_seen > max_wait + math.ceil((starved.max_ready - 1) / capacity)


@pytest.mark.parametrize("name", ["expert-aware", "cache-aware"])
def test_aging_general_bound_with_chunked_prompts(name):
    budget, max_wait = Budget(max_tokens=5, max_seqs=3), 3
    plan = _adversarial([7, 7, 3, 3, 3, 7, 1, 1, 1, 1, 7, 7])
    plan += markov_requests(10, 5, max_prompt=20, max_output=20, spread=30)
    trace = serve(plan, make_scheduler(name, max_wait=max_wait), budget, capacity=2)
    assert trace.max_wait_seen <= max_wait + trace.max_ready - 1
    assert len(trace.queue.finished) == len(plan)


def test_registry_errors():
    with pytest.raises(ReadmoeError, match="unknown scheduler"):
        make_scheduler("sjf")
    with pytest.raises(ReadmoeError, match="does not take"):
        make_scheduler("fcfs", max_wait=3)
    with pytest.raises(ReadmoeError, match="max_wait"):
        make_scheduler("expert-aware", max_wait=0)


def test_expert_aware_cap_keeps_steps_to_max_experts_and_the_aging_bound():
    plan = markov_requests(64, 11, max_prompt=6, max_output=40, spread=20)
    budget, max_wait, cap = Budget(max_tokens=64, max_seqs=64), 6, 2
    trace = serve(plan, make_scheduler("expert-aware", max_wait=max_wait, max_experts=cap),
                  budget)
    assert len(trace.queue.finished) == len(plan)
    assert trace.max_wait_seen <= max_wait + trace.max_ready - 1
    uncapped = serve(plan, make_scheduler("expert-aware", max_wait=max_wait), budget)
    mean = {name: sum(len(b.experts) for b in t.batches) / len(t.batches)
            for name, t in (("capped", trace), ("uncapped", uncapped))}
    assert mean["capped"] < mean["uncapped"]
    # without aging (max_wait out of reach) no step ever exceeds the cap
    never_aged = serve(plan, make_scheduler("expert-aware", max_wait=10_000, max_experts=cap),
                       budget)
    assert max(len(b.experts) for b in never_aged.batches) == cap
    with pytest.raises(ReadmoeError, match="max_experts"):
        make_scheduler("expert-aware", max_experts=0)


def _resident_view(resident, capacity=2):
    from readmoe.serve.types import CacheView

    return CacheView(frozenset(resident), capacity)


def test_cache_aware_prefers_resident_experts_over_a_longer_queue():
    waiting = [Request("a", 0.0, [3] * 5, 2), Request("b", 0.1, [1, 1], 2),
               Request("c", 0.2, [2], 2)]
    budget = Budget(16, 8)
    aware = make_scheduler("cache-aware").schedule(waiting, [], budget, _resident_view({1, 2}))
    assert aware.experts == (1, 2)  # the 2 slots are filled with resident experts, and the
    # 5 tokens of expert 3 are below 2 x load_ratio x the step's 3 tokens: it waits
    cheap = make_scheduler("cache-aware", load_ratio=0.25).schedule(waiting, [], budget,
                                                                     _resident_view({1, 2}))
    assert cheap.experts == (1, 2, 3)  # loads are cheap: beyond the slots too
    blind = make_scheduler("expert-aware", max_experts=2).schedule(waiting, [], budget)
    assert blind.experts == (1, 3)  # expert-aware takes the longest queue, 3, first


def _decoding(request_id, arrival, expert):
    """A request past its one-token prompt, its next token (a decode) on ``expert``."""
    request = Request(request_id, arrival, [expert], 4)
    request.num_computed, request.state = 1, RequestState.RUNNING
    request.output_experts.append(expert)
    return request


def test_decodes_first_keeps_a_long_prompt_from_starving_decodes_of_other_experts():
    running = [_decoding("d1", 0.0, 1), _decoding("d2", 0.1, 2)]
    waiting = [Request("p", 0.2, [3] * 10, 2)]
    budget, view = Budget(8, 8), _resident_view({1, 2, 3}, capacity=3)
    first = make_scheduler("cache-aware").schedule(waiting, running, budget, view)
    # the decodes of experts 1 and 2 run; the prompt's run of expert 3 fills the rest
    assert {c.request_id: c.num_tokens for c in first.chunks} == {"d1": 1, "d2": 1, "p": 6}
    plain = make_scheduler("cache-aware", decodes_first=False).schedule(waiting, running,
                                                                        budget, view)
    # the longest queue (the prompt's 10 tokens of expert 3) fills the budget: both decodes wait
    assert {c.request_id: c.num_tokens for c in plain.chunks} == {"p": 8}
    aware = make_scheduler("expert-aware", decodes_first=True).schedule(waiting, running, budget)
    assert {c.request_id for c in aware.chunks} == {"d1", "d2", "p"}


def test_cache_aware_admits_a_cold_expert_only_for_a_long_enough_queue():
    waiting = [Request("a", 0.0, [1] * 4, 2), Request("b", 0.1, [3, 3], 2)]
    budget = Budget(16, 8)
    view = _resident_view({1})
    strict = make_scheduler("cache-aware", load_ratio=1.0).schedule(waiting, [], budget, view)
    assert strict.experts == (1,)  # 2 tokens of expert 3 < 1.0 x the step's 4 tokens
    loose = make_scheduler("cache-aware", load_ratio=0.25).schedule(waiting, [], budget, view)
    assert loose.experts == (1, 3)
    cold = make_scheduler("cache-aware").schedule(waiting, [], budget, _resident_view(set()))
    assert cold.num_tokens > 0  # nothing resident: a step still runs


def test_cache_aware_saves_loads_under_locality_and_keeps_the_budget():
    plan = markov_requests(48, 7, experts=6, max_prompt=6, max_output=30, spread=20)
    budget = Budget(max_tokens=16, max_seqs=16)
    misses = {}
    for name in ("fcfs", "cache-aware"):
        trace = serve(plan, make_scheduler(name, **({"max_wait": 6} if name != "fcfs" else {})),
                      budget, capacity=2)
        assert len(trace.queue.finished) == len(plan)
        assert all(b.num_tokens <= budget.max_tokens and b.num_seqs <= budget.max_seqs
                   for b in trace.batches)
        misses[name] = trace.cache.stats.misses
    assert misses["cache-aware"] < 0.6 * misses["fcfs"], misses
    with pytest.raises(ReadmoeError, match="load_ratio"):
        make_scheduler("cache-aware", load_ratio=-1)
