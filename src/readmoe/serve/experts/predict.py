"""Predicting a decoding request's next expert, where the router's foresight ends.

Why: the pre-gating router names a token's expert as soon as the token exists, but a decoding
request's next token exists only once this step has sampled it. Without a guess, Belady sees no
future for any decode and falls back to LRU, and nothing can be loaded ahead for the next step.
The router is strongly local in time (the trained default reuses the previous token's expert
for about two thirds of tokens; the paper measured 71%), so a request's recent experts predict
its next one well.

Rule: ``last`` predicts the expert of the request's latest known token; ``mode-K`` the most
frequent expert among its last K known tokens (ties to the most recent). Fallback: a request
with no known token predicts nothing (its next use stays unknown, ``math.inf`` for Belady).
Which rule to use is a measurement (``accuracy`` on held-out routing; benchmarks/codesign.py
reports it), not an assumption.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from readmoe.errors import ReadmoeError
from readmoe.serve.types import UNKNOWN_EXPERT, Request


@dataclass(frozen=True)
class NextExpertPredictor:
    """Predict from the last ``window`` known experts (1: the latest one)."""

    window: int = 1

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ReadmoeError(f"a predictor's window must be at least 1, got {self.window}")

    @property
    def name(self) -> str:
        return "last" if self.window == 1 else f"mode-{self.window}"

    def predict_from(self, history: Sequence[int]) -> int | None:
        """The predicted next expert after ``history`` (oldest first), or None if empty."""
        recent = [e for e in history[-self.window:] if e != UNKNOWN_EXPERT]
        if not recent:
            return None
        counts = Counter(recent)
        best = max(counts.values())
        return next(e for e in reversed(recent) if counts[e] == best)

    def predict(self, request: Request) -> int | None:
        """The expert ``request``'s next token will most likely use."""
        known = request.prompt_experts + request.output_experts
        return self.predict_from(known[max(0, len(known) - self.window):])


def make_predictor(name: str) -> NextExpertPredictor:
    """``last`` or ``mode-K`` (K >= 2)."""
    if name == "last":
        return NextExpertPredictor(1)
    if name.startswith("mode-") and name[5:].isdigit() and int(name[5:]) >= 2:
        return NextExpertPredictor(int(name[5:]))
    raise ReadmoeError(f"unknown predictor {name!r}; use 'last' or 'mode-K' with K >= 2")


def accuracy(predictor: NextExpertPredictor,
             requests: Iterable[tuple[int, Sequence[int]]]) -> dict:
    """How often ``predictor`` names a fed-back output token's expert from the tokens before
    it: each request is (prompt length, its whole expert sequence), and every position from the
    prompt length on is predicted, as the engine predicts it (the prompt is known up front)."""
    right = total = 0
    for prompt_len, sequence in requests:
        for t in range(max(prompt_len, 1), len(sequence)):
            total += 1
            right += predictor.predict_from(sequence[:t]) == sequence[t]
    return {"predictor": predictor.name, "predictions": total,
            "accuracy": right / total if total else None}
