"""The request lifecycle: the state changes every engine applies around a step.

The real engine and the simulator both keep their requests here, so a request moves through
waiting -> running -> finished, and ages, by one set of rules:

- ``schedule`` asks the scheduler for a batch, checks it against the budget and the chunking
  rule (a scheduler that breaks them is a bug, reported at once), then marks its tokens as
  computed, so a pipelined engine may schedule the next step before this one completes. A
  request with pending tokens left out of the batch ages by one step; a scheduled one resets.
- ``complete`` records the outputs of an executed batch: each sampling chunk yields one token
  at time ``now``; the caller passes each new token's expert (from the pre-gating router), or
  None to end the request early (EOS, stop string). A request ends after ``max_tokens`` outputs.
- ``abort`` drops an unfinished request at once; it is not counted among the finished.
"""

from __future__ import annotations

from collections.abc import Mapping

from readmoe.errors import ReadmoeError
from readmoe.serve.schedulers import Scheduler
from readmoe.serve.types import Batch, Budget, CacheView, Request, RequestState


class RequestQueue:
    """Waiting, running and finished requests, by id."""

    def __init__(self) -> None:
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.finished: list[Request] = []
        self._by_id: dict[str, Request] = {}

    def add(self, request: Request) -> None:
        if request.request_id in self._by_id:
            raise ReadmoeError(f"request id {request.request_id!r} is already in the queue")
        if request.state is not RequestState.WAITING or request.num_computed:
            raise ReadmoeError(f"request {request.request_id} was already started")
        self._by_id[request.request_id] = request
        self.waiting.append(request)

    def abort(self, request_id: str) -> Request:
        """Take an unfinished request out of the queue (marked finished, not in ``finished``)."""
        request = self._by_id.get(request_id)
        if request is None or request.state is RequestState.FINISHED:
            raise ReadmoeError(f"request {request_id!r} is not waiting or running")
        (self.waiting if request.state is RequestState.WAITING else self.running).remove(request)
        request.state = RequestState.FINISHED
        return request

    def pending(self) -> list[Request]:
        """Unfinished requests with a known token to process: running first, then waiting."""
        return [r for r in [*self.running, *self.waiting] if r.pending_experts]

    def schedule(self, scheduler: Scheduler, budget: Budget,
                 view: CacheView | None = None) -> Batch:
        """Ask ``scheduler`` for the next batch (telling it what the expert cache holds, if
        ``view``) and mark its tokens as computed."""
        ready = self.pending()
        batch = scheduler.schedule(self.waiting, self.running, budget, view)
        self._check(batch, budget, scheduler.name)
        scheduled = {chunk.request_id for chunk in batch.chunks}
        for chunk in batch.chunks:
            request = self._by_id[chunk.request_id]
            request.num_computed += chunk.num_tokens
            request.steps_waited = 0
            if request.state is RequestState.WAITING:
                request.state = RequestState.RUNNING
                self.waiting.remove(request)
                self.running.append(request)
        for request in ready:
            if request.request_id not in scheduled:
                request.steps_waited += 1
                request.total_waited += 1
        return batch

    def complete(self, batch: Batch, sampled: Mapping[str, int | None],
                 now: float) -> list[Request]:
        """Record the batch's output tokens at time ``now``; return the requests that ended."""
        ended = []
        for chunk in batch.chunks:
            if not chunk.samples:
                continue
            request = self._by_id[chunk.request_id]
            request.output_times.append(now)
            last = request.num_output == request.max_tokens
            expert = None if last else sampled[request.request_id]
            if expert is None:
                request.state = RequestState.FINISHED
                self.running.remove(request)
                self.finished.append(request)
                ended.append(request)
            else:
                request.output_experts.append(expert)
        return ended

    def _check(self, batch: Batch, budget: Budget, name: str) -> None:
        if batch.num_tokens > budget.max_tokens or batch.num_seqs > budget.max_seqs:
            raise ReadmoeError(f"scheduler {name!r} exceeded its budget: {batch.num_tokens} "
                               f"tokens, {batch.num_seqs} sequences for {budget}")
        seen = set()
        for chunk in batch.chunks:
            request = self._by_id.get(chunk.request_id)
            if request is None or request.state is RequestState.FINISHED:
                raise ReadmoeError(f"scheduler {name!r} scheduled unknown or finished request "
                                   f"{chunk.request_id!r}")
            pending = request.pending_experts
            if (chunk.request_id in seen or chunk.start != request.num_computed
                    or not chunk.experts
                    or list(chunk.experts) != pending[:chunk.num_tokens]
                    or chunk.num_tokens > len(pending)):
                raise ReadmoeError(f"scheduler {name!r} broke the chunking rule for request "
                                   f"{chunk.request_id!r}: a step holds one contiguous chunk "
                                   "of its pending tokens")
            seen.add(chunk.request_id)
