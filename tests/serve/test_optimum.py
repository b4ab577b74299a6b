"""The offline optimum equals a brute-force search over every choice its model allows, no policy
beats it or the ceiling on the same realised accesses, and token-grain counting is what it
says."""

import random
from functools import cache
from itertools import combinations

import pytest

from readmoe.serve.experts import ExpertCache, FutureUses, make_policy
from readmoe.serve.experts.optimum import bounds, optimum_hits, token_grain_hits


def _sequence(seed, length, experts, largest):
    rng = random.Random(seed)
    return [sorted(rng.sample(range(experts), rng.randint(1, min(largest, experts))))
            for _ in range(length)]


def _brute_force_hits(sequence, capacity):
    """Most hits over every final set an access may leave: any ``capacity`` experts of what it
    needed and what was resident, holding at least one missed expert when some missed."""
    @cache
    def best(t, resident):
        if t == len(sequence):
            return 0
        needed = frozenset(sequence[t])
        missed = needed - resident
        pool = sorted(needed | resident)
        size = min(capacity, len(pool))
        options = [frozenset(f) for f in combinations(pool, size)
                   if not missed or set(f) & missed]
        return len(needed & resident) + max(best(t + 1, f) for f in options)

    return best(0, frozenset())


def _policy_hits(name, sequence, capacity, seed=0):
    future = FutureUses.from_trace([[(0, e) for e in experts] for experts in sequence])
    expert_cache = ExpertCache(capacity, [1], make_policy(name, seed))
    for time, experts in enumerate(sequence):
        expert_cache.plan_access(0, experts, time, future)
    return expert_cache.stats.hits


def test_the_optimum_equals_brute_force_on_tiny_sequences():
    for seed in range(250):
        rng = random.Random(seed)
        capacity = rng.randint(1, 3)
        sequence = _sequence(seed, 9, rng.randint(2, 5), rng.randint(1, 4))
        assert optimum_hits(sequence, capacity) == _brute_force_hits(sequence, capacity), seed


@pytest.mark.parametrize("policy", ["random", "lru", "lfu", "belady"])
def test_no_policy_beats_the_optimum_or_the_ceiling(policy):
    for seed in range(60):
        rng = random.Random(seed)
        capacity = rng.randint(1, 4)
        sequence = _sequence(seed, 80, rng.randint(3, 8), rng.randint(1, 6))  # some overflow
        found = bounds([(0, s) for s in sequence], capacity)
        hits = _policy_hits(policy, sequence, capacity, seed)
        assert hits <= found.hits <= found.ceiling_hits, (seed, policy)
        assert found.accesses == sum(map(len, sequence))


def test_bounds_count_layers_apart():
    sequence = [[0, 1], [1, 2], [0, 2]]
    one = bounds([(0, s) for s in sequence], 2)
    two = bounds([(layer, s) for s in sequence for layer in (0, 1)], 2)
    assert (two.accesses, two.hits, two.ceiling_hits) == (2 * one.accesses, 2 * one.hits,
                                                          2 * one.ceiling_hits)
    assert one.ceiling == 1.0 and one.optimum_hit_ratio == pytest.approx(3 / 6)
    assert bounds([], 2).ceiling is None


def test_token_grain_counts_one_access_per_token():
    steps = [[0, 0, 1], [1, 1], [0]]  # tokens in batch order
    lru = token_grain_hits(steps, 1, "lru")
    assert lru["accesses"] == 6
    assert lru["hit_ratio"] == pytest.approx(3 / 6)  # 0 once, 1 twice; the last 0 misses
    assert token_grain_hits(steps, 2, "belady")["hit_ratio"] == pytest.approx(4 / 6)
