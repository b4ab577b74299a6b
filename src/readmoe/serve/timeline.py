"""The simulator's clock for one step plan: a compute stream and a copy stream, as the engine has.

Why: the engine executes a ``StepPlan`` on a copy engine (``experts/loader.py``) beside compute;
the simulator must time the same plan the same way, so its latencies are a model of this
engine and not of some other one. The rules, mirrored from ``experts/store.py``:

- Compute, per layer in order: the layer's own work (attention, shared expert: ``layer_fixed_s
  + token_s * tokens``), then its routed experts in the plan's order (``expert_s`` each); an
  expert starts once the load that brought it has finished (a hit on an expert still loading
  waits too). Positions count routed experts computed, across steps, as the store counts them.
- Copy: one stream, each load taking ``load_time``, starting no earlier than its issue, the end
  of the compute position it waits for (``Load.after``) and the end of the earlier load into
  its slot. Whenever the stream is free it starts the oldest urgent load that may start, else
  the oldest background one (the next step's prefetches); a background load a planned step
  needs, or that an urgent load into its slot follows, becomes urgent (the copy engine's rules,
  ``experts/loader.py``). With prefetch the step's loads are issued at its start, then the
  next step's speculative ones; on demand a layer's loads are issued when its own work is done.
- The step ends ``step_overhead_s`` after its last layer (sampling, routing, bookkeeping); the
  copy stream runs on through it and into the next step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from readmoe.errors import ReadmoeError
from readmoe.serve.cost import CostModel
from readmoe.serve.experts.cache import LayerPlan, Load
from readmoe.serve.experts.plan import StepPlan


@dataclass
class _Queued:
    ident: int
    load: Load
    issued: float
    after: int | None  # global compute position
    follows: int | None  # the earlier load into the same slot


@dataclass
class StreamClock:
    """The copy stream and compute position state carried from step to step."""

    copy_free: float = 0.0  # when the copy stream finishes the load it has started
    position: int = 0  # routed experts computed so far (the store's clock)
    latest: dict[tuple[int, int], int] = field(default_factory=dict)  # key -> its last load
    done: dict[int, float] = field(default_factory=dict)  # load -> when it finished
    _slots: dict[tuple[int, int], int] = field(default_factory=dict)  # (layer, slot) -> load
    _urgent: list[_Queued] = field(default_factory=list)
    _background: list[_Queued] = field(default_factory=list)
    _ends: dict[int, float] = field(default_factory=dict)  # position -> compute end
    _issued: int = 0
    spent: float = 0.0  # load seconds run since the last ``take_spent``

    def issue(self, load: Load, at: float, offsets: dict[int, int]) -> int:
        after = None if load.after is None else offsets[load.after[0]] + load.after[1]
        ident = self._issued
        self._issued += 1
        follows = self._slots.get((load.layer, load.slot))
        item = _Queued(ident, load, at, after, follows)
        (self._background if load.speculative else self._urgent).append(item)
        if not load.speculative and follows is not None:
            self.promote(follows)
        self.latest[load.layer, load.expert] = self._slots[load.layer, load.slot] = ident
        return ident

    def promote(self, ident: int) -> None:
        for item in self._background:
            if item.ident == ident:
                self._background.remove(item)
                self._urgent = sorted([*self._urgent, item], key=lambda i: i.ident)
                if item.follows is not None:
                    self.promote(item.follows)
                return

    def _ready_at(self, item: _Queued) -> float | None:
        """When ``item`` may start, or None while what it waits for has not happened."""
        times = [item.issued]
        if item.after is not None:
            if item.after not in self._ends:
                return None
            times.append(self._ends[item.after])
        if item.follows is not None:
            if item.follows not in self.done:
                return None
            times.append(self.done[item.follows])
        return max(times)

    def _start_next(self, before: float | None, cost: CostModel) -> bool:
        """Start the load the stream picks next if it starts before ``before`` (None: any
        time); return whether one started."""
        heads = [(queue, queue[0], self._ready_at(queue[0]))
                 for queue in (self._urgent, self._background) if queue]
        known = [(queue, item, at) for queue, item, at in heads if at is not None]
        if not known:
            return False
        free = self.copy_free
        ready = [h for h in known if h[2] <= free]
        queue, item, at = ready[0] if ready else min(known, key=lambda h: (h[2], h[0] is not
                                                                        self._urgent))
        start = max(free, at)
        if before is not None and start >= before:
            return False
        queue.remove(item)
        seconds = cost.load_time(item.load.layer, 1)
        self.copy_free = start + seconds
        self.done[item.ident] = self.copy_free
        self.spent += seconds
        return True

    def advance(self, now: float, cost: CostModel) -> None:
        """Run the stream's decisions that happen before ``now`` (later ones may still see
        loads issued meanwhile)."""
        while self._start_next(now, cost):
            pass

    def wait_for(self, ident: int, now: float, cost: CostModel) -> float:
        """Compute waits at ``now`` for load ``ident``: when it is done."""
        self.advance(now, cost)
        while ident not in self.done:
            if not self._start_next(None, cost):
                raise ReadmoeError("a load waits for compute that waits for it: the plan "
                                   "computes an expert before a load issued ahead of it")
        return self.done[ident]

    def computed(self, position: int, end: float) -> None:
        self._ends[position] = end

    def take_spent(self) -> float:
        spent, self.spent = self.spent, 0.0
        return spent

    def prune(self) -> None:
        """Forget the compute ends no queued load can wait for any more."""
        queued = [*self._urgent, *self._background]
        oldest = min((i.after for i in queued if i.after is not None), default=self.position)
        self._ends = {p: t for p, t in self._ends.items() if p >= oldest}


def _issue_layer(clock: StreamClock, layer_plan: LayerPlan, at: float, offsets: dict[int, int],
                 waits: dict[tuple[int, int], int | None]) -> None:
    """Fix what each expert of the layer waits for (its own load, else the one that brought
    it earlier, made urgent), then issue the layer's loads, as the store does."""
    for expert in layer_plan.order:
        ident = clock.latest.get((layer_plan.layer, expert))
        if ident is not None:
            clock.promote(ident)
        waits[layer_plan.layer, expert] = ident
    for load in layer_plan.loads:
        waits[load.layer, load.expert] = clock.issue(load, at, offsets)


def run_step(clock: StreamClock, cost: CostModel, plan: StepPlan, layer_plans: dict[int,
             LayerPlan], start: float, num_tokens: int, prefetch: bool) -> tuple[float, float,
                                                                               float]:
    """Time one step from ``start``: (end, load seconds run meanwhile, stall seconds).

    ``layer_plans`` are every routed layer's plans (``plan.layers``, or those a layer-wise run
    made as it went); layers without one compute their own work only.
    """
    offsets, position = {}, clock.position
    for layer in sorted(layer_plans):
        offsets[layer] = position
        position += len(layer_plans[layer].order)
    waits: dict[tuple[int, int], int | None] = {}
    stall = 0.0
    if prefetch:
        for layer in sorted(layer_plans):
            _issue_layer(clock, layer_plans[layer], start, offsets, waits)
        for load in plan.speculative:
            clock.issue(load, start, offsets)
    now = start
    for layer in range(cost.num_layers):
        now += cost.layer_fixed_s + cost.token_s * num_tokens
        layer_plan = layer_plans.get(layer)
        if layer_plan is None:
            continue
        if not prefetch:
            _issue_layer(clock, layer_plan, now, offsets, waits)
        for index, expert in enumerate(layer_plan.order):
            ident = waits[layer, expert]
            if ident is not None:
                ready = clock.wait_for(ident, now, cost)
                if ready > now:
                    stall += ready - now
                    now = ready
            now += cost.expert_s
            clock.computed(offsets[layer] + index, now)
    clock.position = position
    end = now + cost.step_overhead_s
    clock.advance(end, cost)
    clock.prune()
    return end, clock.take_spent(), stall
