"""Eviction policies for the expert cache, chosen by name: random, lru, lfu, belady.

One interface: the cache reports every use of a key (``touched``, on a hit or right after a
load) and asks for a ``victim`` among the resident keys of one layer when a miss finds that
layer full. Every policy knows the order of uses (for LRU and for tie-breaking).

When a layer needs more experts than it has slots, it computes them one by one and each load
reuses the slot of an expert already computed, so the order decides which experts are left
resident: ``release_order`` ranks keys from the first to give up its slot to the last. Only
Belady knows the future, so only it orders by it (furthest next use first, so the experts
needed soonest are computed last and stay); the others keep key order.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

from readmoe.errors import ReadmoeError
from readmoe.serve.experts.future import ExpertKey, FutureUses


class EvictionPolicy(ABC):
    name: ClassVar[str]

    def __init__(self) -> None:
        self.last_use: dict[ExpertKey, int] = {}
        self._order = 0

    def touched(self, key: ExpertKey) -> None:
        """``key`` was used (a hit, or just loaded); uses arrive in execution order."""
        self._order += 1
        self.last_use[key] = self._order

    @abstractmethod
    def victim(self, resident: Sequence[ExpertKey], time: int,
               future: FutureUses) -> ExpertKey:
        """The key to evict among ``resident`` (sorted, non-empty) at ``time``."""

    def release_order(self, keys: Sequence[ExpertKey], time: int,
                      future: FutureUses) -> list[ExpertKey]:
        """``keys`` (one access) in compute order when they cannot all stay (module docs)."""
        return sorted(keys)


class RandomPolicy(EvictionPolicy):
    """Evict a uniformly random resident key (seeded, so runs repeat)."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self._rng = random.Random(seed)

    def victim(self, resident: Sequence[ExpertKey], time: int,
               future: FutureUses) -> ExpertKey:
        return self._rng.choice(resident)


class LRUPolicy(EvictionPolicy):
    """Evict the least recently used key (uses are ordered, so there are no ties)."""

    name = "lru"

    def victim(self, resident: Sequence[ExpertKey], time: int,
               future: FutureUses) -> ExpertKey:
        return min(resident, key=self.last_use.__getitem__)


class LFUPolicy(EvictionPolicy):
    """Evict the least frequently used key; ties by least recent use.

    Counts span the whole run, not just the current stay in the cache ("perfect" LFU), since
    expert popularity is a property of the workload: an in-cache count would evict every newly
    loaded expert first.
    """

    name = "lfu"

    def __init__(self) -> None:
        super().__init__()
        self.count: dict[ExpertKey, int] = {}

    def touched(self, key: ExpertKey) -> None:
        super().touched(key)
        self.count[key] = self.count.get(key, 0) + 1

    def victim(self, resident: Sequence[ExpertKey], time: int,
               future: FutureUses) -> ExpertKey:
        return min(resident, key=lambda k: (self.count[k], self.last_use[k]))


class BeladyPolicy(EvictionPolicy):
    """Belady's MIN: evict the key whose next known use is furthest away.

    Keys with no known next use count as infinitely far; ties (among those, or at equal times)
    go to the least recently used, so with no known future Belady is LRU.
    """

    name = "belady"

    def victim(self, resident: Sequence[ExpertKey], time: int,
               future: FutureUses) -> ExpertKey:
        return max(resident, key=lambda k: (future.next_use(k, time),
                                            -self.last_use.get(k, 0)))

    def release_order(self, keys: Sequence[ExpertKey], time: int,
                      future: FutureUses) -> list[ExpertKey]:
        return sorted(keys, key=lambda k: (-future.next_use(k, time), k))


POLICIES: dict[str, type[EvictionPolicy]] = {
    cls.name: cls for cls in (RandomPolicy, LRUPolicy, LFUPolicy, BeladyPolicy)
}


def make_policy(name: str, seed: int = 0) -> EvictionPolicy:
    """Build the policy registered as ``name``; ``seed`` only matters for ``random``."""
    if name not in POLICIES:
        raise ReadmoeError(f"unknown cache policy {name!r}; choose one of {', '.join(POLICIES)}")
    return RandomPolicy(seed) if name == RandomPolicy.name else POLICIES[name]()
