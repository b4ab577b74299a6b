"""Cache-aware expert-aware batching: fill a step with the experts already in the cache.

Why: with routed experts offloaded, an expert the cache lacks costs a load of that expert in
every routed layer before the step can use it, far more than the compute its tokens need.
Expert-aware batching (``expert_aware.py``) already fills a step from few experts; this variant
also knows which experts are resident (``CacheView``) and prefers them.

One step, with ``S`` the experts chosen so far, ``C`` the cache's slots per layer (or
``max_experts``) and ``n`` the tokens scheduled so far:

1. Aging, exactly as in ``ExpertAware``: requests that have waited ``max_wait`` steps or more,
   longest wait first, get their next run whatever its expert.
2. Closure, as in ``ExpertAware``: requests whose next run's expert is in ``S`` take it.
3. Stop if the budget is full or something did not fit. While ``|S| < C``: add the resident
   expert with the longest queue (ties: the queue holding the highest-priority request) and go
   to 2; with no resident one left, add the longest non-resident queue if it holds at least
   ``load_ratio * n`` tokens and go to 2. Once ``|S| >= C``: add the longest queue only if it
   holds at least ``2 * load_ratio * n`` tokens; otherwise stop.

Steps 2 and 3 run first over the decoding requests alone, then over all (``decodes_first``,
``expert_aware.py``): a long prompt run of the longest queue would otherwise fill the budget and
make every decode of another resident expert wait a step.

The rule in 3 weighs what an expert costs against what it serves: loading it delays every
token of the step by about ``load_ratio`` step times (``load_ratio`` = loading one expert into
every routed layer over one step's compute: small from RAM, large behind a slow link), while
its queue's tokens would otherwise wait a step. Beyond the cache's slots an expert costs two
loads, its own and the reload of the expert it displaces from a slot the next step wants. So
behind a slow link steps stay within the cache, while from RAM, where a load is cheap, a step
takes every expert with a queue, as FCFS would. A step never stays empty while something is
ready (with ``n = 0`` any queue passes). Experts a prefetcher brings in for the next step
(``plan.py``) are resident by the time it is scheduled, so they count as resident.

Aging bound. Let ``W = max_wait`` and ``R`` the largest number of requests with pending tokens
at one time. A request waits at most ``W + R - 1`` consecutive steps. Proof: step 1 is
``ExpertAware``'s, and its proof uses step 1 only. Order requests by (wait desc, arrival, id).
Step 1 always schedules the first aged request (the budget is empty then and holds at least
one token and one sequence). Once request r has waited W steps, every request ahead of it is
aged too; a request ahead of r stays ahead while neither is scheduled, a scheduled one drops to
wait 0, behind r, and newcomers start at 0, behind r. So the at most R - 1 requests ahead of r
lose at least one member per step until r is first: r runs within R steps of turning W. The
cap and the resident preference only act in step 3, after the aged requests, so they cannot
lengthen any wait beyond the bound.

Trade-off: preferring resident experts saves loads and adds waiting for the tokens of the
others; benchmarks/codesign.py measures both (hit ratio and bytes loaded against latency).
"""

from __future__ import annotations

from readmoe.errors import ReadmoeError
from readmoe.serve.schedulers.expert_aware import ExpertAware, longest
from readmoe.serve.types import CacheView


class CacheAware(ExpertAware):
    """``ExpertAware`` with a preference for resident experts and a load-cost threshold for the
    others (module docstring)."""

    name = "cache-aware"

    def __init__(self, max_wait: int = 8, max_experts: int | None = None,
                 load_ratio: float = 1.0, decodes_first: bool = True) -> None:
        super().__init__(max_wait, max_experts, decodes_first)
        if not load_ratio >= 0:
            raise ReadmoeError(f"cache-aware load_ratio must be >= 0, got {load_ratio}")
        self.load_ratio = load_ratio

    def choose(self, queues: dict[int, tuple[int, int]], num_tokens: int, chosen: int,
               view: CacheView | None) -> int | None:
        slots = self.max_experts or (view.capacity if view is not None else None)
        resident = view.resident if view is not None else frozenset()
        warm = {e: q for e, q in queues.items() if e in resident}
        if slots is not None and chosen >= slots:
            best, threshold = longest(queues), 2 * self.load_ratio * num_tokens
        elif warm:
            return longest(warm)
        else:
            best, threshold = longest(queues), self.load_ratio * num_tokens
        return best if queues[best][0] >= threshold else None
