"""A cache of routed experts in accelerator memory: ``capacity`` slots per layer.

Shared experts and attention stay resident; only routed experts move. The cache keeps the
bookkeeping (which expert sits in which slot, the counters) and leaves every eviction choice to
its policy, so the engine and the simulator share it and differ only in who copies the weights
and what the clock is.

One access (``plan_access``) is all the experts one layer of one step needs, used at one time;
it returns that layer's plan: the order its experts compute in and the loads to issue, each
naming its slot and, where the slot's current expert is still to compute in this access, the
position in the order the load must wait for.

- Within capacity, the access's experts are resident together while the layer computes (one
  grouped computation): hits compute first, then the misses in load order, and each miss takes
  a free slot or evicts the policy's victim among the experts this access does not need, so no
  load waits for compute. Under this rule Belady with a fully known future is optimal.
- Beyond capacity, the layer computes expert by expert and each load reuses the slot of an
  expert already computed: hits first, then the misses, both in the policy's
  ``release_order`` (Belady: furthest next use first), each miss evicting the policy's victim
  among the resident experts not still to compute. With Belady the experts left resident are
  then the ones needed soonest; that is a heuristic (ties between experts of one access decide
  later hits), and ``optimum.py`` computes the true bound.

``install`` is a load nobody asked for yet: a prefetch the planner made from a prediction
(``speculate.py``). Counters: ``hits`` and ``misses`` per needed expert (a hit is an expert
resident, or already on its way, when its layer's access is planned), ``evictions``,
``prefetched`` (installs) and ``prefetch_used`` (installs hit before their eviction),
``bytes_moved`` (every load, ``expert_bytes[layer]`` each). ``load_s`` and ``stall_s`` are
filled by whoever copies (the store, or the simulator's clock).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, astuple, dataclass

from readmoe.errors import ReadmoeError
from readmoe.serve.experts.future import FutureUses
from readmoe.serve.experts.policies import EvictionPolicy


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes_moved: int = 0
    prefetched: int = 0
    prefetch_used: int = 0
    load_s: float = 0.0  # seconds the copy stream spent loading
    stall_s: float = 0.0  # seconds compute waited for loads

    @property
    def accesses(self) -> int:
        return self.hits + self.misses

    @property
    def loads(self) -> int:
        """Every copy into the fast tier: the misses and the prefetches."""
        return self.misses + self.prefetched

    @property
    def hit_ratio(self) -> float | None:
        return self.hits / self.accesses if self.accesses else None

    @property
    def load_ratio(self) -> float | None:
        """Loads per access: 1 - hit ratio on demand; a prefetcher's wasted loads show here."""
        return self.loads / self.accesses if self.accesses else None

    @property
    def hidden_fraction(self) -> float | None:
        """Share of load time that compute did not wait for (0 on demand)."""
        return max(0.0, 1.0 - self.stall_s / self.load_s) if self.load_s > 0 else None

    def since(self, earlier: CacheStats) -> CacheStats:
        """The counters accumulated after ``earlier`` was taken."""
        return CacheStats(*(now - then for now, then in zip(astuple(self), astuple(earlier),
                                                             strict=True)))

    def to_dict(self) -> dict:
        return {**asdict(self), "hit_ratio": self.hit_ratio, "load_ratio": self.load_ratio,
                "hidden_fraction": self.hidden_fraction}


@dataclass(frozen=True)
class Load:
    """Copy ``expert`` of ``layer`` into ``slot``. ``after``: (layer, index in that layer's
    compute order) of the expert of this step whose slot this is and which must compute first
    (None: start at once)."""

    layer: int
    expert: int
    slot: int
    after: tuple[int, int] | None = None
    speculative: bool = False


@dataclass(frozen=True)
class LayerPlan:
    """One layer's access: ``order`` is the compute order, ``slots`` where each expert sits
    (after its load), ``loads`` in issue order."""

    layer: int
    time: int
    order: tuple[int, ...]
    slots: dict[int, int]
    loads: tuple[Load, ...]


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
        self._slots: list[dict[int, int]] = [{} for _ in self.expert_bytes]
        self._unused_prefetch: set[tuple[int, int]] = set()

    def resident(self, layer: int) -> frozenset[int]:
        """Experts of ``layer`` now in the cache (or on their way)."""
        return frozenset(self._slots[layer])

    def resident_everywhere(self, layers: Iterable[int]) -> frozenset[int]:
        """Experts resident in every one of ``layers``: what a step can use without a load."""
        sets = [self._slots[layer].keys() for layer in layers]
        return frozenset(set.intersection(*map(set, sets))) if sets else frozenset()

    def slot(self, layer: int, expert: int) -> int:
        return self._slots[layer][expert]

    def has_free_slot(self, layer: int) -> bool:
        return len(self._slots[layer]) < self.capacity

    def plan_access(self, layer: int, experts: Iterable[int], time: int,
                    future: FutureUses) -> LayerPlan:
        """Use ``experts`` of ``layer`` at ``time``: count, choose victims, assign slots."""
        needed = sorted(set(experts))
        slots = self._slots[layer]
        where = {e: slots[e] for e in needed if e in slots}  # each expert's slot as it computes
        hits = [e for e in needed if e in slots]
        misses = [e for e in needed if e not in slots]
        for expert in hits:
            self.stats.hits += 1
            self.policy.touched((layer, expert))
            if (layer, expert) in self._unused_prefetch:
                self._unused_prefetch.discard((layer, expert))
                self.stats.prefetch_used += 1
        policy = self.policy
        if len(needed) <= self.capacity:
            order = hits + misses
            loads = [self._load(layer, expert, set(needed), time, future, None)
                     for expert in misses]
        else:
            order = [e for _, e in policy.release_order([(layer, e) for e in hits], time, future)]
            order += [e for _, e in policy.release_order([(layer, e) for e in misses], time,
                                                         future)]
            index = {expert: i for i, expert in enumerate(order)}
            loads = [self._load(layer, expert, set(order[index[expert]:]), time, future, index)
                     for expert in order[len(hits):]]
        where.update({load.expert: load.slot for load in loads})
        return LayerPlan(layer, time, tuple(order), where, tuple(loads))

    def install(self, layer: int, expert: int, victim: int | None, time: int,
                future: FutureUses, after: int | None = None) -> Load:
        """Load ``expert`` of ``layer`` before any access asks for it, into a free slot or over
        ``victim``; ``after`` is the victim's index in this step's compute order of ``layer``,
        if it still computes in this step."""
        slots = self._slots[layer]
        if expert in slots:
            raise ReadmoeError(f"expert {expert} of layer {layer} is already resident")
        if victim is None:
            if not self.has_free_slot(layer):
                raise ReadmoeError(f"layer {layer} has no free slot for a prefetch")
            slot = self._free_slot(layer)
        else:
            slot = self._evict(layer, victim)
        slots[expert] = slot
        self.policy.touched((layer, expert))
        self.stats.prefetched += 1
        self.stats.bytes_moved += self.expert_bytes[layer]
        self._unused_prefetch.add((layer, expert))
        return Load(layer, expert, slot, None if after is None else (layer, after),
                    speculative=True)

    def _load(self, layer: int, expert: int, pending: set[int], time: int, future: FutureUses,
              index: dict[int, int] | None) -> Load:
        """Load one miss: a free slot, else the policy's victim among the resident experts
        not in ``pending`` (still to compute in this access)."""
        slots = self._slots[layer]
        after = None
        if self.has_free_slot(layer):
            slot = self._free_slot(layer)
        else:
            candidates = sorted((layer, e) for e in slots if e not in pending)
            victim = self.policy.victim(candidates, time, future)[1]
            position = index.get(victim) if index is not None else None
            after = None if position is None else (layer, position)
            slot = self._evict(layer, victim)
        slots[expert] = slot
        self.stats.misses += 1
        self.stats.bytes_moved += self.expert_bytes[layer]
        self.policy.touched((layer, expert))
        return Load(layer, expert, slot, after)

    def _free_slot(self, layer: int) -> int:
        return min(set(range(self.capacity)) - set(self._slots[layer].values()))

    def _evict(self, layer: int, victim: int) -> int:
        self.stats.evictions += 1
        self._unused_prefetch.discard((layer, victim))
        return self._slots[layer].pop(victim)
