"""Shared test helpers: requests with a known future, and a model-free serving loop."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from readmoe.refactor.slicing import save_readme
from readmoe.serve.experts import ExpertCache, FutureUses, make_policy
from readmoe.serve.queue import RequestQueue
from readmoe.serve.routing_sources import MarkovRouting
from readmoe.serve.schedulers import Scheduler
from readmoe.serve.types import Batch, Budget, CacheView, Request
from tests.model.test_modeling_readme import tiny_readme


@dataclass
class Planned:
    """A request arriving at ``step`` whose every token's expert is fixed in advance."""

    request_id: str
    step: int
    experts: list[int]  # prompt, then the fed-back outputs
    prompt_len: int
    max_tokens: int


@dataclass
class Trace:
    batches: list[Batch] = field(default_factory=list)
    queue: RequestQueue = field(default_factory=RequestQueue)
    max_wait_seen: int = 0  # largest steps_waited of any ready request, checked every step
    max_ready: int = 0  # most requests with a pending token at one step (the bound's R)
    cache: ExpertCache | None = None  # the LRU expert cache the scheduler was shown


def planned(request_id: str, step: int, prompt: Sequence[int], outputs: Sequence[int],
            max_tokens: int | None = None) -> Planned:
    max_tokens = len(outputs) + 1 if max_tokens is None else max_tokens
    return Planned(request_id, step, [*prompt, *outputs], len(prompt), max_tokens)


def markov_requests(count: int, seed: int, *, experts: int = 8, max_prompt: int = 12,
                    max_output: int = 10, spread: int = 0) -> list[Planned]:
    """``count`` requests with Markov routing, arriving over ``spread`` steps."""
    rng = random.Random(seed)
    routing = MarkovRouting(experts)
    result = []
    for i in range(count):
        prompt_len, max_tokens = rng.randint(1, max_prompt), rng.randint(1, max_output)
        sequence = routing.extend((), prompt_len + max_tokens - 1, rng)
        result.append(Planned(f"r{i}", rng.randint(0, spread), sequence, prompt_len, max_tokens))
    return result


def serve(plan: Sequence[Planned], scheduler: Scheduler, budget: Budget,
          max_steps: int = 100_000, capacity: int | None = None) -> Trace:
    """Run ``plan`` to completion with one time unit per step; reveal outputs as sampled.
    With ``capacity``, a one-layer LRU expert cache of that many slots serves every batch and
    the scheduler is shown what it holds."""
    trace = Trace(cache=ExpertCache(capacity, [1], make_policy("lru")) if capacity else None)
    truth = {p.request_id: p for p in plan}
    arrivals = sorted(plan, key=lambda p: p.step)
    admitted = 0
    for step in range(max_steps):
        while admitted < len(arrivals) and arrivals[admitted].step <= step:
            p = arrivals[admitted]
            trace.queue.add(Request(p.request_id, float(p.step), p.experts[:p.prompt_len],
                                    p.max_tokens))
            admitted += 1
        if admitted == len(arrivals) and not (trace.queue.waiting or trace.queue.running):
            return trace
        ready = trace.queue.pending()
        trace.max_wait_seen = max([trace.max_wait_seen, *(r.steps_waited for r in ready)])
        trace.max_ready = max(trace.max_ready, len(ready))
        if not ready:
            continue
        view = (CacheView(trace.cache.resident(0), capacity) if trace.cache is not None
                else None)
        batch = trace.queue.schedule(scheduler, budget, view)
        trace.batches.append(batch)
        if trace.cache is not None:
            trace.cache.plan_access(0, batch.experts, step, FutureUses())
        sampled = {c.request_id: truth[c.request_id].experts[c.start + c.num_tokens]
                   for c in batch.chunks
                   if c.samples and c.start + c.num_tokens < len(truth[c.request_id].experts)}
        trace.queue.complete(batch, sampled, now=float(step))
    raise AssertionError(f"not finished after {max_steps} steps")


def saved_tiny_readme(tmp_path_factory, seed: int, name: str):
    """(a tiny ReadME model, the folder it was saved to): what store and prefetch tests read."""
    model = tiny_readme(seed)
    folder = tmp_path_factory.mktemp(name) / "model"
    save_readme(model, folder)
    return model, folder
