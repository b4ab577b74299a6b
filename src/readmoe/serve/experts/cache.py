"""A cache of routed experts in accelerator memory: ``capacity`` slots per layer.

Shared experts and attention stay resident; only routed experts move. The cache keeps the
bookkeeping (which keys are resident, the counters) and leaves every eviction choice to its
policy, so the engine and the simulator share it and differ only in who copies the weights.

One access (``access``) is all the keys one layer of one step needs, used at one time. When
they fit in the layer's slots, they are all resident together while the layer computes (one
grouped expert computation), so a miss evicts only a key the access does not need: the
policy's victim among the others. Under this rule, Belady with a fully known future is
optimal (the tests check it against a brute-force search). When an access needs more experts
than the layer has slots, the layer computes expert by expert: hits first, then the misses in
key order, each evicting the policy's victim among all resident keys of the layer (any key of
this access is by then used); there Belady is a heuristic.

Counters: ``hits`` and ``misses`` per needed key, ``evictions``, ``bytes_moved``
(``expert_bytes[layer]`` per load). Every miss is exactly one load and nothing else loads (the
cache starts empty), so loads are not counted apart.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from readmoe.errors import ReadmoeError
from readmoe.serve.experts.future import ExpertKey, FutureUses
from readmoe.serve.experts.policies import EvictionPolicy


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes_moved: int = 0

    @property
    def hit_ratio(self) -> float | None:
        accesses = self.hits + self.misses
        return self.hits / accesses if accesses else None

    def to_dict(self) -> dict:
        return {**asdict(self), "hit_ratio": self.hit_ratio}


class ExpertCache:
    """Per-layer expert slots driven by an eviction policy."""

    def __init__(self, capacity: int, expert_bytes: Sequence[int],
                 policy: EvictionPolicy) -> None:
        if capacity < 1:
            raise ReadmoeError(f"expert cache capacity must be at least 1 per layer, "
                               f"got {capacity}")
        self.capacity = capacity
        self.expert_bytes = tuple(expert_bytes)
        self.policy = policy
        self.stats = CacheStats()
        self._resident: list[set[int]] = [set() for _ in self.expert_bytes]

    def resident(self, layer: int) -> frozenset[int]:
        """Experts of ``layer`` now in the cache."""
        return frozenset(self._resident[layer])

    def access(self, keys: Sequence[ExpertKey], time: int, future: FutureUses) -> list[ExpertKey]:
        """Use ``keys`` at ``time``; return the keys that missed and were loaded, in load order."""
        return [key for key, _ in self.access_loads(keys, time, future)]

    def access_loads(self, keys: Sequence[ExpertKey], time: int, future: FutureUses
                     ) -> list[tuple[ExpertKey, ExpertKey | None]]:
        """``access``, also saying whose slot each load takes: (missed key, evicted key or None
        for a free slot). An owner that copies weights needs it: a load that evicts a key this
        access needs must wait until that key's expert has computed."""
        needed = sorted(set(keys))
        by_layer: dict[int, set[int]] = defaultdict(set)
        for layer, expert in needed:
            by_layer[layer].add(expert)
        misses = [key for key in needed if key[1] not in self._resident[key[0]]]
        for key in needed:
            if key[1] in self._resident[key[0]]:
                self.stats.hits += 1
                self.policy.touched(key)
        loads = []
        for layer, expert in misses:
            slots = self._resident[layer]
            victim = None
            if len(slots) >= self.capacity:
                keep = by_layer[layer] if len(by_layer[layer]) <= self.capacity else set()
                victim = self.policy.victim(sorted((layer, e) for e in slots - keep), time,
                                            future)
                slots.remove(victim[1])
                self.stats.evictions += 1
            slots.add(expert)
            self.stats.misses += 1
            self.stats.bytes_moved += self.expert_bytes[layer]
            self.policy.touched((layer, expert))
            loads.append(((layer, expert), victim))
        return loads
