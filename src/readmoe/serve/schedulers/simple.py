"""The expert-oblivious baselines: first-come-first-served, decode-first, prefill-first.

Each is an order of requests; a request in that order gets all its pending tokens that still
fit (a prompt that does not fit whole is chunked), until the budget is full.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from readmoe.serve.schedulers.base import BatchBuilder, Scheduler, by_arrival
from readmoe.serve.types import Batch, Budget, CacheView, Request


def _fill(budget: Budget, order: Iterable[Request]) -> Batch:
    builder = BatchBuilder(budget)
    for request in order:
        if builder.full:
            break
        builder.take(request, builder.remaining(request))
    return builder.build()


class FCFS(Scheduler):
    """Oldest request first, prefill or decode alike."""

    name = "fcfs"

    def schedule(self, waiting: Sequence[Request], running: Sequence[Request],
                 budget: Budget, view: CacheView | None = None) -> Batch:
        return _fill(budget, by_arrival([*running, *waiting]))


class DecodeFirst(Scheduler):
    """DeepSpeed-FastGen style: every running decode first, then prefills fill what is left.

    Prefills: partially prefilled (running) prompts before new (waiting) ones, each oldest first.
    """

    name = "decode-first"

    def schedule(self, waiting: Sequence[Request], running: Sequence[Request],
                 budget: Budget, view: CacheView | None = None) -> Batch:
        active = by_arrival(running)
        decodes = [r for r in active if not r.in_prefill]
        prefills = [r for r in active if r.in_prefill] + by_arrival(waiting)
        return _fill(budget, decodes + prefills)


class PrefillFirst(Scheduler):
    """vLLM (v0) / TGI style: prefills first (partial ones, then new ones), decodes after."""

    name = "prefill-first"

    def schedule(self, waiting: Sequence[Request], running: Sequence[Request],
                 budget: Budget, view: CacheView | None = None) -> Batch:
        active = by_arrival(running)
        prefills = [r for r in active if r.in_prefill] + by_arrival(waiting)
        decodes = [r for r in active if not r.in_prefill]
        return _fill(budget, prefills + decodes)
