import math
import random

import pytest

from readmoe.errors import ReadmoeError
from readmoe.serve.experts import (
    POLICIES,
    ExpertCache,
    FutureUses,
    access_time,
    make_policy,
    step_needs,
)
from readmoe.serve.types import UNKNOWN_EXPERT, Batch, Chunk, Request, RequestState


def _trace(seed, length, experts, group=3):
    """Random single-layer accesses with locality: each reuses recent experts often."""
    rng = random.Random(seed)
    trace, current = [], rng.randrange(experts)
    for _ in range(length):
        size = rng.randint(1, min(group, experts))
        chosen = set()
        while len(chosen) < size:
            if rng.random() < 0.5:
                current = rng.randrange(experts)
            chosen.add(current)
        trace.append(sorted(chosen))
    return trace


def _run(name, trace, capacity, seed=0, future=None):
    cache = ExpertCache(capacity, [100], make_policy(name, seed))
    future = future if future is not None else FutureUses.from_trace(
        [[(0, e) for e in experts] for experts in trace])
    plans = [cache.plan_access(0, experts, time, future) for time, experts in enumerate(trace)]
    return cache, plans


def _brute_force_grouped_misses(trace, capacity):
    """Fewest misses over every victim choice the cache's within-capacity rule allows (every
    needed expert resident together, victims among the others)."""
    from functools import cache

    @cache
    def best(t, resident):
        if t == len(trace):
            return 0
        needed = frozenset(trace[t])
        misses = needed - resident
        keep = resident - needed
        evict = max(0, len(resident | needed) - capacity)
        options = [keep - set(drop) for drop in _subsets(sorted(keep), evict)]
        return len(misses) + min(best(t + 1, frozenset(o | needed)) for o in options)

    return best(0, frozenset())


def _subsets(items, size):
    from itertools import combinations

    return list(combinations(items, size))


def test_belady_with_the_whole_future_is_optimal_when_accesses_fit():
    beaten = 0
    for seed in range(200):
        rng = random.Random(seed)
        capacity = rng.randint(1, 4)
        trace = _trace(seed, 12, experts=rng.randint(2, 6), group=capacity)
        optimum = _brute_force_grouped_misses(trace, capacity)
        belady = _run("belady", trace, capacity)[0].stats.misses
        assert belady == optimum, seed
        beaten += optimum < _run("lru", trace, capacity)[0].stats.misses
    assert beaten > 20  # the traces are hard enough that LRU is often not optimal


def test_plans_compute_hits_first_and_every_load_has_a_slot():
    cache = ExpertCache(2, [10], make_policy("lru"))
    first = cache.plan_access(0, [3, 1], 0, FutureUses())
    assert first.order == (1, 3) and [load.expert for load in first.loads] == [1, 3]
    assert sorted(first.slots.values()) == [0, 1] and all(ld.after is None for ld in first.loads)
    second = cache.plan_access(0, [3, 5], 1, FutureUses())
    assert second.order == (3, 5)  # the hit first
    (load,) = second.loads
    assert load.slot == first.slots[1] and load.after is None  # 1's slot, nobody waits
    assert cache.resident(0) == {3, 5}


def test_over_capacity_the_soonest_needed_experts_are_left_resident():
    # 2 slots; one access needs 4 experts. Their next uses: 7 at t=1, 4 at t=2, then 5, 6 later.
    uses = {(0, 4): [0, 2], (0, 5): [0, 9], (0, 6): [0, 8], (0, 7): [0, 1]}
    future = FutureUses(uses)
    cache = ExpertCache(2, [1], make_policy("belady"))
    cache.plan_access(0, [5, 6], -1, FutureUses({(0, 5): [0], (0, 6): [0]}))  # 5, 6 resident
    plan = cache.plan_access(0, [4, 5, 6, 7], 0, future)
    assert plan.order == (5, 6, 4, 7)  # hits, then misses, each furthest next use first
    assert cache.resident(0) == {4, 7}
    slots = {load.expert: load for load in plan.loads}
    assert slots[4].after == (0, plan.order.index(5))  # 4 overwrites 5 once 5 has computed
    assert slots[7].after == (0, plan.order.index(6))
    assert cache.stats.misses == 2 + 2 and cache.stats.hits == 2


def test_over_capacity_lru_keeps_key_order():
    cache = ExpertCache(1, [1], make_policy("lru"))
    plan = cache.plan_access(0, [0, 1, 2], 0, FutureUses())
    assert plan.order == (0, 1, 2) and cache.resident(0) == {2}
    assert [ld.after for ld in plan.loads] == [None, (0, 0), (0, 1)]
    assert cache.stats.evictions == 2


def test_counters_bytes_and_installs():
    cache = ExpertCache(2, [10, 30], make_policy("lru"))
    future = FutureUses()
    cache.plan_access(0, [1, 2], 0, future)
    cache.plan_access(1, [4], 1, future)
    cache.plan_access(0, [1], 2, future)
    load = cache.install(0, 3, 2, 3, future)  # prefetch 3 over 2
    assert load.speculative and load.slot == 1 and cache.resident(0) == {1, 3}
    with pytest.raises(ReadmoeError, match="already resident"):
        cache.install(0, 3, None, 3, future)
    with pytest.raises(ReadmoeError, match="no free slot"):
        cache.install(0, 4, None, 3, future)
    cache.plan_access(0, [3], 4, future)  # the prefetch is used
    cache.install(1, 5, None, 5, future)
    cache.install(1, 6, 5, 5, future)  # evicted unused: wasted
    stats = cache.stats
    assert (stats.hits, stats.misses, stats.evictions) == (2, 3, 2)
    assert (stats.prefetched, stats.prefetch_used) == (3, 1)
    assert stats.bytes_moved == 10 * 3 + 30 * 3
    assert stats.loads == 6 and stats.load_ratio == pytest.approx(6 / 5)
    assert stats.to_dict()["hit_ratio"] == pytest.approx(0.4)


def test_policy_choices():
    future = FutureUses({(0, 1): [9], (0, 2): [5]})
    for name, expected in (("lru", 1), ("lfu", 2), ("belady", 3)):
        cache = ExpertCache(3, [1], make_policy(name))
        for experts in ([1], [1], [2], [3]):
            cache.plan_access(0, experts, 0, future)
        cache.plan_access(0, [4], 1, future)
        assert {1, 2, 3} - cache.resident(0) == {expected}, name
    runs = [_run("random", _trace(1, 50, 6), 2, seed=7)[0].stats.misses for _ in range(2)]
    assert runs[0] == runs[1]


def test_belady_without_a_known_future_is_lru():
    trace = _trace(4, 80, 6)
    results = [_run(name, trace, 2, future=FutureUses())[0].stats for name in ("belady", "lru")]
    assert results[0] == results[1]


def test_a_miss_never_evicts_an_expert_its_own_access_needs_when_the_access_fits():
    cache = ExpertCache(2, [1], make_policy("lru"))
    cache.plan_access(0, [1], 0, FutureUses())
    cache.plan_access(0, [2], 1, FutureUses())
    plan = cache.plan_access(0, [1, 3], 2, FutureUses())
    assert [ld.expert for ld in plan.loads] == [3]
    assert cache.resident(0) == {1, 3}  # 2 went, though 1 was used before it


def test_resident_everywhere_is_the_intersection():
    cache = ExpertCache(2, [1, 1], make_policy("lru"))
    cache.plan_access(0, [1, 2], 0, FutureUses())
    cache.plan_access(1, [2, 3], 1, FutureUses())
    assert cache.resident_everywhere([0, 1]) == {2}
    assert cache.resident_everywhere([]) == frozenset()


def test_future_uses_next_use():
    future = FutureUses({(0, 1): [3, 7, 7, 12]})
    assert future.next_use((0, 1), 2) == 3
    assert future.next_use((0, 1), 3) == 7
    assert future.next_use((0, 1), 12) == math.inf
    assert future.next_use((0, 9), 0) == math.inf


def test_future_from_schedule_estimates_when_queued_tokens_run():
    batch = Batch((Chunk("a", 0, (1, 1), True, True),))
    decoding = Request("d", 0.0, [5], 9, output_experts=[6, 7], num_computed=2,
                       state=RequestState.RUNNING)
    queued = [Request("b", 0.0, [2, 2, 3], 4), Request("c", 0.0, [UNKNOWN_EXPERT, 4], 4),
              decoding]
    known = FutureUses.from_schedule(step=5, num_layers=2, batch=batch, queued=queued,
                                     tokens_per_step=2)
    assert known.next_use((1, 1), 0) == access_time(5, 1, 2)  # this step, layer 1
    assert known.next_use((0, 1), 10) == math.inf  # no known use after this step
    assert known.next_use((0, 2), 10) == 6 * 2  # b's prompt: next step
    assert known.next_use((1, 3), 11) == 6 * 2 + 1
    assert known.next_use((0, 4), 10) == 7 * 2  # c's prompt starts after b's 3 tokens
    assert known.next_use((0, 7), 10) == 8 * 2  # d's decode token after 5 queued tokens
    lookahead = {"b": [2, 2, 3, 0], "c": [0, 4, 4], "d": [5, 6, 7, 1, 2]}
    oracle = FutureUses.from_schedule(step=5, num_layers=2, batch=batch, queued=queued,
                                      tokens_per_step=2, lookahead=lookahead)
    assert oracle.next_use((0, 1), 10) == 9 * 2  # d decodes 7, then 1 a step later
    assert oracle.next_use((0, 0), 10) == 7 * 2  # b's first output; c's hidden first token
    assert oracle.next_use((0, 2), 10) == 6 * 2  # the earliest of b's and d's uses


def test_predicted_uses_fill_in_where_the_next_token_is_unknown():
    sampled = Request("s", 0.0, [1], 5, output_experts=[4], num_computed=2,
                      state=RequestState.RUNNING)  # its next token is sampled this step
    batch = Batch((Chunk("s", 1, (4,), False, True),))
    plain = FutureUses.from_schedule(3, 2, batch, [sampled], 8)
    guessed = FutureUses.from_schedule(3, 2, batch, [sampled], 8, predicted={"s": 4})
    assert plain.next_use((0, 4), access_time(3, 1, 2)) == math.inf
    assert guessed.next_use((0, 4), access_time(3, 1, 2)) == access_time(4, 0, 2)
    assert guessed.next_use((1, 9), 0) == math.inf


def test_step_needs_lists_each_layer_in_order():
    assert step_needs([3, 1, 3, UNKNOWN_EXPERT], 2) == [[(0, 1), (0, 3)], [(1, 1), (1, 3)]]


def test_registry_and_capacity_errors():
    assert set(POLICIES) == {"random", "lru", "lfu", "belady"}
    with pytest.raises(ReadmoeError, match="unknown cache policy"):
        make_policy("arc")
    with pytest.raises(ReadmoeError, match="capacity"):
        ExpertCache(0, [1], make_policy("lru"))
