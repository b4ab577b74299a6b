"""Sources of per-token expert ids for simulated requests.

A routing source continues a known expert sequence (a prompt's) to a requested length: the
simulator uses it to know each request's whole future (prompt and output), and reveals it
only as the pre-gating router would. The real source (the trained router over real text) comes
with the model; ``MarkovRouting`` is the synthetic one with the temporal locality the paper
measured: 2921 of 4096 tokens reuse the previous token's expert.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from readmoe.errors import ReadmoeError

PAPER_REUSE = 2921 / 4096
"""Read-ME's measured probability that a token reuses the previous token's expert."""


class RoutingSource(Protocol):
    def extend(self, known: Sequence[int], length: int, rng: random.Random) -> list[int]:
        """``known`` followed by expert ids up to ``length`` tokens in all."""
        ...


@dataclass(frozen=True)
class MarkovRouting:
    """Keep the previous token's expert with probability ``reuse``, else jump to another.

    Jumps (and the first token) pick experts by ``popularity`` weights (uniform if None); a
    jump never lands on the expert it leaves, so ``reuse`` is exactly the reuse probability.
    """

    num_experts: int
    reuse: float = PAPER_REUSE
    popularity: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.num_experts < 2:
            raise ReadmoeError("Markov routing needs at least 2 experts")
        if not 0.0 <= self.reuse < 1.0:
            raise ReadmoeError(f"reuse probability must be in [0, 1), got {self.reuse}")
        if self.popularity is not None and (len(self.popularity) != self.num_experts
                                            or min(self.popularity) <= 0):
            raise ReadmoeError(f"popularity needs {self.num_experts} positive weights")

    def extend(self, known: Sequence[int], length: int, rng: random.Random) -> list[int]:
        if len(known) > length:
            raise ReadmoeError(f"{len(known)} known experts exceed the length {length}")
        weights = self.popularity or (1.0,) * self.num_experts
        experts = list(known)
        if not experts and length:
            experts.append(rng.choices(range(self.num_experts), weights)[0])
        while len(experts) < length:
            previous = experts[-1]
            if rng.random() >= self.reuse:
                others = [e for e in range(self.num_experts) if e != previous]
                previous = rng.choices(others, [weights[e] for e in others])[0]
            experts.append(previous)
        return experts
