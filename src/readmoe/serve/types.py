"""The dataclasses that schedulers, expert caches, the engine and the simulator exchange.

They hold expert ids and counts, never tensors, so a scheduler or cache policy written against
them runs unchanged in the real engine and in the simulator.

Token accounting. A request's tokens are its prompt followed by its generated tokens. Every
token the backbone processes is one of: a prompt token (prefill), or a generated token fed
back (decode). Processing the last prompt token samples output 1; processing output k samples
output k+1; output ``max_tokens`` is never fed back. So a request processes
``prompt_len + max_tokens - 1`` tokens and produces ``max_tokens`` outputs.

What is known. With the pre-gating router, a token's expert is known as soon as the token is:
the prompt's at admission, output k's right after the step that sampled it. A request's
*pending* tokens are the known tokens not yet processed; a scheduler may only take a
contiguous prefix of them (``Request.pending_experts``), which is what keeps chunked prefill
causal and makes a decode token wait for the step that produced it. With a layer-wise router
(the baseline) nothing is known before a layer runs: the ids are ``UNKNOWN_EXPERT``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from readmoe.errors import ReadmoeError

UNKNOWN_EXPERT = -1
"""Expert id of a token whose expert is not known ahead of the backbone (layer-wise router)."""


class RequestState(StrEnum):
    WAITING = "waiting"  # arrived, nothing processed yet
    RUNNING = "running"  # at least one token processed
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    """One request as the scheduler sees it (compared by identity, so usable as a dict key).

    ``output_experts`` holds the experts of generated tokens that will be fed back, revealed one
    per step by the engine (``RequestQueue.complete``); ``output_times`` holds when each output
    token was produced, for the metrics. ``steps_waited`` counts consecutive steps in which the
    request had a pending token but none of its tokens was scheduled (the aging rule's clock);
    ``total_waited`` counts all such steps over the request's life (what batching costs it).
    """

    request_id: str
    arrival_time: float
    prompt_experts: list[int]
    max_tokens: int
    output_experts: list[int] = field(default_factory=list)
    num_computed: int = 0
    state: RequestState = RequestState.WAITING
    steps_waited: int = 0
    total_waited: int = 0
    output_times: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.prompt_experts:
            raise ReadmoeError(f"request {self.request_id}: the prompt has no tokens")
        if self.max_tokens < 1:
            raise ReadmoeError(f"request {self.request_id}: max_tokens must be at least 1")

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_experts)

    @property
    def num_output(self) -> int:
        return len(self.output_times)

    @property
    def in_prefill(self) -> bool:
        return self.num_computed < self.prompt_len

    @property
    def pending_experts(self) -> list[int]:
        """Experts of the known tokens not yet processed, in token order."""
        if self.in_prefill:
            return self.prompt_experts[self.num_computed:]
        return self.output_experts[self.num_computed - self.prompt_len:]

    @property
    def next_expert(self) -> int | None:
        """Expert of the next token to process, or None while that token is not known yet."""
        pending = self.pending_experts
        return pending[0] if pending else None


@dataclass(frozen=True)
class Budget:
    """What one step may hold: tokens processed and distinct requests (sequences)."""

    max_tokens: int
    max_seqs: int

    def __post_init__(self) -> None:
        if self.max_tokens < 1 or self.max_seqs < 1:
            raise ReadmoeError("a step budget needs at least one token and one sequence")


@dataclass(frozen=True)
class Chunk:
    """The tokens of one request in one step: positions ``start .. start + len(experts) - 1``.

    ``samples`` is true when processing the chunk yields an output token (the chunk reaches the
    end of the prompt, or is a decode token).
    """

    request_id: str
    start: int
    experts: tuple[int, ...]
    is_prefill: bool
    samples: bool

    @property
    def num_tokens(self) -> int:
        return len(self.experts)


@dataclass(frozen=True)
class Batch:
    """What a scheduler chose for one step: at most one chunk per request."""

    chunks: tuple[Chunk, ...] = ()

    @property
    def num_tokens(self) -> int:
        return sum(chunk.num_tokens for chunk in self.chunks)

    @property
    def num_seqs(self) -> int:
        return len(self.chunks)

    @property
    def experts(self) -> tuple[int, ...]:
        """Distinct known experts of the batch's tokens, ascending."""
        known = {e for chunk in self.chunks for e in chunk.experts if e != UNKNOWN_EXPERT}
        return tuple(sorted(known))


@dataclass(frozen=True)
class StepReport:
    """What one executed step cost, for the metrics (the engine and the simulator fill it).

    ``distinct_experts`` is per layer (averaged over layers when they differ, as with a
    layer-wise router); ``experts`` the step's distinct known experts (what every layer of a
    pre-gating model needs) and ``token_experts`` every token's, in batch order. ``load_s``
    is the time the copy stream spent loading during the step; ``stall_s`` the time the
    compute stream waited for loads.
    """

    step: int
    start_time: float
    end_time: float
    num_tokens: int
    num_seqs: int
    distinct_experts: float
    load_s: float
    stall_s: float
    experts: tuple[int, ...] = ()
    token_experts: tuple[int, ...] = ()


@dataclass(frozen=True)
class CacheView:
    """What a cache-aware scheduler may know of the expert cache: the experts resident in every
    routed layer (a step using only these loads nothing) and the slots per layer."""

    resident: frozenset[int]
    capacity: int
