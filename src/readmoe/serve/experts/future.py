"""What is known about future expert use: Belady's input, and each step's per-layer needs.

Time. The clock ticks once per (step, layer) in execution order: layer ``l`` of step ``s`` runs
at time ``access_time(s, l, num_layers) = s * num_layers + l``, the one definition the engine,
the store and the simulator use. All experts one layer of one step needs are used at that one
time. A cache slot holds one routed expert of one layer, keyed ``(layer, expert)``; in ReadME
one expert id serves every layer, so a step needs the same experts at each layer.

What is known at step ``s`` (``FutureUses.from_schedule``):

- exactly: the step's own tokens, at times ``s * L + l``;
- by estimate: every other known pending token (prompts waiting in the queue, the rest of
  chunked prompts, decode tokens left out of this step). When they run depends on future
  scheduling, so we estimate: requests are served in the order given, each step's token
  budget going to their next chunks (a prompt's rest, or one decode token); a request whose
  next chunk starts after k queued tokens runs it at step ``s + 1 + k // tokens_per_step``
  and then decodes one token per step.

- by prediction, where a caller passes ``predicted``: a request that samples in this step has
  no known next token, so a predictor (``predict.py``) names the expert its next token will
  most likely use, at the next step.

Anything else (tokens not generated yet) is unknown: its next use is ``math.inf``, and Belady
breaks ties between such experts by least recent use. A simulator that knows every request's
whole routing (``lookahead``) can give Belady that too, as an upper bound on what knowing
the future is worth (the paper's Belady reads "pre-computed routing").
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

from readmoe.serve.types import UNKNOWN_EXPERT, Batch, Request

ExpertKey = tuple[int, int]
"""(layer, expert): one routed expert of one layer, the unit the cache holds."""


def access_time(step: int, layer: int, num_layers: int) -> int:
    """When layer ``layer`` of step ``step`` uses its experts (the module's clock)."""
    return step * num_layers + layer


def step_needs(experts: Iterable[int], num_layers: int) -> list[list[ExpertKey]]:
    """The keys a step whose tokens use ``experts`` needs, layer by layer in execution order.

    A prefetcher walks this list to load layer ``l + 1``'s experts while layer ``l`` computes.
    """
    distinct = sorted({e for e in experts if e != UNKNOWN_EXPERT})
    return [[(layer, e) for e in distinct] for layer in range(num_layers)]


class FutureUses:
    """For each key, the known times it will be used (see the module docstring for time)."""

    def __init__(self, uses: Mapping[ExpertKey, Iterable[int]] | None = None) -> None:
        self._uses = {key: sorted(set(times)) for key, times in (uses or {}).items()}

    def next_use(self, key: ExpertKey, after: int) -> float:
        """The first known use of ``key`` strictly after time ``after``; ``math.inf`` if none."""
        times = self._uses.get(key)
        if not times:
            return math.inf
        index = bisect_right(times, after)
        return times[index] if index < len(times) else math.inf

    @classmethod
    def from_trace(cls, trace: Sequence[Iterable[ExpertKey]]) -> FutureUses:
        """A fully known future: ``trace[t]`` holds the keys used at time ``t``."""
        uses: dict[ExpertKey, list[int]] = defaultdict(list)
        for time, keys in enumerate(trace):
            for key in keys:
                uses[key].append(time)
        return cls(uses)

    @classmethod
    def from_schedule(cls, step: int, num_layers: int, batch: Batch, queued: Iterable[Request],
                      tokens_per_step: int,
                      lookahead: Mapping[str, Sequence[int]] | None = None,
                      predicted: Mapping[str, int] | None = None) -> FutureUses:
        """What the pre-gating router tells at ``step``: its batch, plus the known queue.

        ``queued`` are the unfinished requests in the order they are expected to be served
        (after this step's batch was marked computed). ``lookahead`` maps a request id to its
        whole expert sequence, where the caller knows more than the router has revealed;
        ``predicted`` maps a request whose next token is not known yet (it samples in this
        step) to the expert predicted for it, used at the next step. Only
        each expert's first use after this step is kept: no query made during this step can
        return a later one (the object is rebuilt every step).
        """
        first: dict[int, int] = {}  # expert -> its first estimated step after this one
        ahead = 0
        for request in queued:
            experts = list(lookahead[request.request_id][request.num_computed:] if lookahead
                           else request.pending_experts)
            if not experts:
                guess = predicted.get(request.request_id) if predicted else None
                if guess is not None and guess != UNKNOWN_EXPERT and step + 1 < first.get(
                        guess, step + 2):
                    first[guess] = step + 1
                continue
            first_chunk = max(request.prompt_len - request.num_computed, 1)
            start = step + 1 + ahead // tokens_per_step
            for expert in dict.fromkeys(experts):
                at = start + max(0, experts.index(expert) - first_chunk + 1)
                if expert != UNKNOWN_EXPERT and at < first.get(expert, at + 1):
                    first[expert] = at
            ahead += min(first_chunk, len(experts))
        uses: dict[ExpertKey, list[int]] = defaultdict(list)
        for expert in batch.experts:
            for layer in range(num_layers):
                uses[layer, expert].append(access_time(step, layer, num_layers))
        for expert, at in first.items():
            for layer in range(num_layers):
                uses[layer, expert].append(access_time(at, layer, num_layers))
        return cls(uses)
