"""The scheduler interface, and the one batch builder every scheduler fills.

A scheduler only decides *which* tokens run; ``BatchBuilder`` owns the rules every batch must
keep, so no scheduler can break them: never more than ``budget.max_tokens`` tokens or
``budget.max_seqs`` requests, at most one chunk per request, and each chunk a contiguous prefix
of the request's pending tokens (a chunk of a request may be extended, never split).

The engine decides admission (e.g. KV-cache room) by which requests it passes as ``waiting``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

from readmoe.serve.types import Batch, Budget, CacheView, Chunk, Request


class Scheduler(ABC):
    """Chooses the tokens of one step from the waiting and running requests.

    ``view`` tells what the expert cache holds, where the engine has one (None otherwise);
    only cache-aware schedulers read it.
    """

    name: ClassVar[str]

    @abstractmethod
    def schedule(self, waiting: Sequence[Request], running: Sequence[Request],
                 budget: Budget, view: CacheView | None = None) -> Batch:
        """Return the next step's batch; must not change the requests."""


class BatchBuilder:
    """Accumulates chunks for one step within a budget."""

    def __init__(self, budget: Budget) -> None:
        self.budget = budget
        self.num_tokens = 0
        self._taken: dict[Request, int] = {}

    @property
    def room(self) -> int:
        """Tokens still free in this step."""
        return self.budget.max_tokens - self.num_tokens

    @property
    def full(self) -> bool:
        """No token fits any more: no token room, or no sequence slot and nothing to extend."""
        return self.room == 0 or (len(self._taken) == self.budget.max_seqs
                                  and all(self.remaining(r) == 0 for r in self._taken))

    def scheduled(self, request: Request) -> int:
        """Tokens of ``request`` already in this step."""
        return self._taken.get(request, 0)

    def remaining(self, request: Request) -> int:
        """Pending tokens of ``request`` not yet in this step."""
        return len(request.pending_experts) - self.scheduled(request)

    def take(self, request: Request, count: int) -> int:
        """Extend ``request``'s chunk by up to ``count`` tokens; return how many were added."""
        if request not in self._taken and len(self._taken) >= self.budget.max_seqs:
            return 0
        added = max(0, min(count, self.room, self.remaining(request)))
        if added:
            self._taken[request] = self.scheduled(request) + added
            self.num_tokens += added
        return added

    def build(self) -> Batch:
        chunks = []
        for request, count in self._taken.items():
            start = request.num_computed
            chunks.append(Chunk(request_id=request.request_id, start=start,
                                experts=tuple(request.pending_experts[:count]),
                                is_prefill=request.in_prefill,
                                samples=start + count >= request.prompt_len))
        return Batch(tuple(chunks))


def by_arrival(requests: Sequence[Request]) -> list[Request]:
    """Requests with pending tokens, oldest first (ties by id, for determinism)."""
    return sorted((r for r in requests if r.pending_experts),
                  key=lambda r: (r.arrival_time, r.request_id))
