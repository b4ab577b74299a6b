"""Bounds on expert-cache hits, computed on a realised access sequence: what no policy beats.

Why: a policy's hit ratio means little without the best any policy could have done on the same
accesses. Two bounds, both on hits per (step, layer) access (our grain, ``cache.py``):

- ``ceiling``: an access of N experts into C slots hits at most min(C, N) of them, so no policy
  exceeds sum(min(C, N)) / sum(N), whatever it knows.
- ``optimum_hits``: the most hits with the whole sequence known. Model: a layer may compute
  its experts in any order and a load may reuse the slot of any expert already computed, so an
  access of set S with resident set R hits |S & R| and may leave any C experts of S | R
  resident, except that at least one missed expert must stay when some missed (its last load
  needs a slot). Greedy rules are not optimal here (an access of several experts makes their
  next uses tie, and which of them stays decides later accesses: generalised Belady loses hits
  on small random sequences), so the optimum is a dynamic programme over resident sets, exact
  while they are few (at most ``MAX_STATES`` reachable sets, ample for the paper's 6-8
  experts). It bounds our cache from above since the cache's rules allow only part of these
  choices (within capacity it keeps every needed expert; ``cache.py``).

``token_grain_hits`` counts the other grain, the one the paper's Table 4 most likely used: one
access per token (and layer), tokens in batch order. In ReadME every layer sees the same
sequence, so one layer stands for all. Never mix its numbers with the per-(step, layer) ones.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import combinations

from readmoe.errors import ReadmoeError
from readmoe.serve.experts.cache import ExpertCache
from readmoe.serve.experts.future import FutureUses
from readmoe.serve.experts.policies import make_policy


@dataclass(frozen=True)
class Bounds:
    accesses: int
    hits: int  # the offline optimum's
    ceiling_hits: int

    @property
    def optimum_hit_ratio(self) -> float | None:
        return self.hits / self.accesses if self.accesses else None

    @property
    def ceiling(self) -> float | None:
        return self.ceiling_hits / self.accesses if self.accesses else None

    def to_dict(self) -> dict:
        return {"accesses": self.accesses, "optimum_hits": self.hits,
                "optimum_hit_ratio": self.optimum_hit_ratio, "ceiling": self.ceiling}


MAX_STATES = 20_000


def optimum_hits(sequence: Sequence[Iterable[int]], capacity: int) -> int:
    """Most hits on one layer's access sequence (sets of experts) with ``capacity`` slots."""
    best: dict[frozenset[int], int] = {frozenset(): 0}
    for experts in sequence:
        needed = frozenset(experts)
        following: dict[frozenset[int], int] = {}
        for resident, hits in best.items():
            gained = hits + len(needed & resident)
            missed = needed - resident
            pool = sorted(needed | resident)
            for kept in combinations(pool, min(capacity, len(pool))):
                if missed and missed.isdisjoint(kept):
                    continue
                kept = frozenset(kept)
                if following.get(kept, -1) < gained:
                    following[kept] = gained
        if len(following) > MAX_STATES:
            raise ReadmoeError(f"the offline optimum would track {len(following)} resident "
                               f"sets (more than {MAX_STATES}): too many experts for an exact "
                               "search")
        best = following
    return max(best.values())


def bounds(accesses: Iterable[tuple[int, Iterable[int]]], capacity: int) -> Bounds:
    """Both bounds over ``accesses``: (layer, experts) in time order, layers independent."""
    by_layer: dict[int, list[frozenset[int]]] = defaultdict(list)
    for layer, experts in accesses:
        by_layer[layer].append(frozenset(experts))
    total = sum(len(s) for sets in by_layer.values() for s in sets)
    ceiling = sum(min(capacity, len(s)) for sets in by_layer.values() for s in sets)
    hits = sum(optimum_hits(sets, capacity) for sets in by_layer.values())
    return Bounds(total, hits, ceiling)


def token_grain_hits(steps: Sequence[Sequence[int]], capacity: int, policy: str,
                     seed: int = 0) -> dict:
    """Hit ratio with one access per token: ``steps`` holds each step's token experts in batch
    order. Belady here knows the whole token sequence (exact future)."""
    sequence = [expert for tokens in steps for expert in tokens]
    future = FutureUses.from_trace([[(0, e)] for e in sequence])
    cache = ExpertCache(capacity, [1], make_policy(policy, seed))
    for time, expert in enumerate(sequence):
        cache.plan_access(0, [expert], time, future)
    return {"policy": policy, "accesses": len(sequence), "hit_ratio": cache.stats.hit_ratio}
