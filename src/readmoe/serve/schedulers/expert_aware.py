"""Expert-aware batching: the paper's Algorithm 1, corrected, with an aging rule.

Why: a step's latency grows linearly with the number of distinct experts its tokens use, and
the pre-gating router tells every token's expert before the step. So fill the step with few
experts: keep one queue of pending tokens per expert and repeatedly take the longest queue.

Queues and chunking. A request may only run a contiguous prefix of its pending tokens, so only
its *next run* (the maximal block of consecutive pending tokens with one expert) can run next:
a decode token is a run of one; a prompt is a sequence of runs. Each request sits in exactly
one queue, that of its next run's expert, counted with the run's length. A prompt advances by
runs, and in one step it may cross into its following runs for free whenever their experts are
already in the step (the *closure* below), so a prompt whose experts the step already uses is
prefilled in one go, and a prompt is never split except where the next expert is not chosen
or the budget ends (then the run is cut: chunked prefill).

One step (``schedule``), with ``S`` the set of experts chosen so far:

1. Aging: requests that have waited ``max_wait`` steps or more, longest wait first (then
   arrival, then id), each get their next run (cut to what fits) and its expert joins ``S``,
   until the budget is full.
2. Closure: every request whose next run's expert is in ``S`` takes that run, repeatedly,
   in priority order (longest wait, arrival, id), as far as the budget allows.
3. If something of ``S`` did not fit, or the budget is full, or no queue is left: stop.
   Otherwise add the expert with the longest queue (ties: the queue holding the
   highest-priority request) to ``S`` and go to 2. (Taking a queue is step 2 with its expert
   added: all of it if it fits, else as much as fits, then stop.)

It ends: each pass of 3 adds a new expert, and there are finitely many (the printed algorithm
never stops once every queue is empty).

Cap (our extension, off by default): with ``max_experts`` K, step 3 adds no expert once ``S``
holds K, so a step's experts fit an expert cache of K per layer; tokens of other experts wait
for a later step. Aged requests (step 1) still run whatever their expert, so ``S`` may exceed
K then, and the aging bound below is unchanged (its proof uses step 1 only). Why: the paper's
rule stops only when the budget is full, so under a light load every queue fits and it
schedules every expert; with experts offloaded, a step's misses cost far more than waiting.

Decodes first (option, off by default; on in ``cache_aware.py``): steps 2 and 3 run first over
the decoding requests alone, then over all. Why: the longest queue is usually a prompt's run,
which can fill the budget on its own, and then every decode of another expert waits a whole
step (up to ``max_wait``), a step of latency for each of those requests where a prompt token
waiting costs its request a fraction of one; vLLM and Sarathi-Serve schedule decodes before
chunked prefill for the same reason. Decodes are one token each, so they take at most
``max_seqs`` tokens, and the prompts' runs fill what is left. The aging bound is unchanged
(its proof uses step 1 only).

Aging bound. Let ``W = max_wait`` and ``R`` the largest number of requests with pending tokens
at one time. A request waits at most ``W + R - 1`` consecutive steps. Proof: order requests by
(wait desc, arrival, id). Step 1 always schedules the first aged request (the budget is empty
then and holds at least one token and one sequence). Once request r has waited W steps, every
request ahead of it in the order is aged too; a request ahead of r stays ahead while neither is
scheduled (both waits grow by one), a scheduled one drops to wait 0, behind r, and newcomers
start at 0, behind r. So the set ahead of r, at most R - 1 requests, loses at least one member
per step until r is first: r runs within R steps of turning W. When every aged request's next
run is one token (decoding), step 1 serves ``C = min(max_seqs, max_tokens)`` of them per step
and the bound tightens to ``W + ceil((R - 1) / C)``.
"""

from __future__ import annotations

from collections.abc import Sequence

from readmoe.errors import ReadmoeError
from readmoe.serve.schedulers.base import BatchBuilder, Scheduler
from readmoe.serve.types import Batch, Budget, CacheView, Request


def _runs(experts: Sequence[int]) -> list[tuple[int, int]]:
    """(expert, end offset) of each maximal block of equal consecutive experts."""
    runs: list[tuple[int, int]] = []
    for end, expert in enumerate(experts, start=1):
        if runs and runs[-1][0] == expert:
            runs[-1] = (expert, end)
        else:
            runs.append((expert, end))
    return runs


class ExpertAware(Scheduler):
    """Longest expert queue first, with aging after ``max_wait`` steps and an optional cap of
    ``max_experts`` chosen experts per step (module docstring)."""

    name = "expert-aware"

    def __init__(self, max_wait: int = 8, max_experts: int | None = None,
                 decodes_first: bool = False) -> None:
        if max_wait < 1:
            raise ReadmoeError(f"expert-aware max_wait must be at least 1 step, got {max_wait}")
        if max_experts is not None and max_experts < 1:
            raise ReadmoeError(f"expert-aware max_experts must be at least 1, got {max_experts}")
        self.max_wait = max_wait
        self.max_experts = max_experts
        self.decodes_first = decodes_first

    def schedule(self, waiting: Sequence[Request], running: Sequence[Request],
                 budget: Budget, view: CacheView | None = None) -> Batch:
        order = sorted((r for r in [*running, *waiting] if r.pending_experts),
                       key=lambda r: (-r.steps_waited, r.arrival_time, r.request_id))
        step = _Step(BatchBuilder(budget), {r: _runs(r.pending_experts) for r in order})

        for request in order:
            if request.steps_waited < self.max_wait or step.builder.full:
                break
            expert = step.runs[request][0][0]
            step.advance(request)
            if step.builder.scheduled(request):
                step.chosen.add(expert)

        if self.decodes_first:
            self._fill(step, [r for r in order if not r.in_prefill], view)
        self._fill(step, order, view)
        return step.builder.build()

    def _fill(self, step: _Step, order: list[Request], view: CacheView | None) -> None:
        """Steps 2 and 3 over the requests of ``order``."""
        while not step.close(order) and not step.builder.full:
            queues: dict[int, tuple[int, int]] = {}
            for rank, request in enumerate(order):
                if (expert := step.next_expert(request)) is not None:
                    end = step.runs[request][step.next_run[request]][1]
                    size, first = queues.get(expert, (0, rank))
                    queues[expert] = (size + end - step.builder.scheduled(request), first)
            expert = (self.choose(queues, step.builder.num_tokens, len(step.chosen), view)
                      if queues else None)
            if expert is None:
                return
            step.chosen.add(expert)

    def choose(self, queues: dict[int, tuple[int, int]], num_tokens: int, chosen: int,
               view: CacheView | None) -> int | None:
        """Step 3's next expert from ``queues`` (expert -> (tokens, rank of its first
        request)) when ``chosen`` experts are in the step, or None to stop: the longest queue,
        ties to the higher-priority request; none once ``max_experts`` are chosen."""
        if self.max_experts is not None and chosen >= self.max_experts:
            return None
        return longest(queues)


def longest(queues: dict[int, tuple[int, int]]) -> int:
    """The expert with the most queued tokens, ties to the queue of the highest-priority
    request."""
    return max(queues, key=lambda e: (queues[e][0], -queues[e][1]))


class _Step:
    """One scheduling pass: the batch so far, the chosen experts, each request's next run."""

    def __init__(self, builder: BatchBuilder, runs: dict[Request, list[tuple[int, int]]]):
        self.builder = builder
        self.runs = runs
        self.next_run = dict.fromkeys(runs, 0)
        self.chosen: set[int] = set()

    def advance(self, request: Request) -> bool:
        """Take the rest of ``request``'s next run; False if it did not all fit."""
        end = self.runs[request][self.next_run[request]][1]
        needed = end - self.builder.scheduled(request)
        if self.builder.take(request, needed) < needed:
            return False
        self.next_run[request] += 1
        return True

    def close(self, order: list[Request]) -> bool:
        """Give every request its next runs whose experts are chosen; True if one did not fit."""
        blocked = False
        for request in order:
            while (expert := self.next_expert(request)) is not None and expert in self.chosen:
                if not self.advance(request):
                    blocked = True
                    break
        return blocked

    def next_expert(self, request: Request) -> int | None:
        """Expert of ``request``'s next run, or None when all its pending tokens are taken."""
        index = self.next_run[request]
        return self.runs[request][index][0] if index < len(self.runs[request]) else None
