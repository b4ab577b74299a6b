"""Whether two models' task scores differ by more than chance, on the same items.

Why paired: every model answers the same items, so an item's difficulty is shared and cancels
in the per-item difference. The standard error of the mean difference is then far smaller than
what the two models' own standard errors would suggest when combined as if independent (at
n = 500 a 3-point gap can be significant paired and not unpaired). The test is the paired
z-test on 0/1 scores (for large n the same decision as McNemar's); an average over tasks treats
the tasks as independent samples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Difference:
    """Mean of ``a - b`` with its standard error; ``p`` two-sided under a normal null."""

    mean: float
    stderr: float
    n: int

    @property
    def z(self) -> float:
        if self.stderr == 0.0:
            return 0.0 if self.mean == 0.0 else math.copysign(math.inf, self.mean)
        return self.mean / self.stderr

    @property
    def p(self) -> float:
        return math.erfc(abs(self.z) / math.sqrt(2.0))

    def significant(self, alpha: float = 0.05) -> bool:
        return self.p < alpha

    def as_dict(self) -> dict:
        return {"mean": self.mean, "stderr": self.stderr, "n": self.n, "z": self.z,
                "p": self.p, "significant": self.significant()}


def mean_stderr(values: Sequence[float]) -> float:
    """Standard error of the mean (sample standard deviation over sqrt n), as lm-eval's."""
    n = len(values)
    if n < 2:
        raise ValueError(f"a standard error needs at least 2 values, got {n}")
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def paired_difference(a: Sequence[float], b: Sequence[float]) -> Difference:
    """``a`` minus ``b`` scored on the same items, in the same order."""
    if len(a) != len(b):
        raise ValueError(f"paired scores need the same items: {len(a)} vs {len(b)}")
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    return Difference(sum(diffs) / len(diffs), mean_stderr(diffs), len(diffs))


def average_difference(differences: Sequence[Difference]) -> Difference:
    """The difference of the unweighted task averages (tasks independent of each other)."""
    if not differences:
        raise ValueError("no task differences to average")
    count = len(differences)
    return Difference(sum(d.mean for d in differences) / count,
                      math.sqrt(sum(d.stderr ** 2 for d in differences)) / count,
                      sum(d.n for d in differences))


def sign_test(differences: Sequence[float]) -> float:
    """Two-sided exact sign test p-value that positive and negative ``differences`` are equally
    likely (zeros dropped, as is standard): for a few paired repeats of a noisy timing, where a
    normal approximation would not hold. 1.0 when no difference is non-zero."""
    signs = [d for d in differences if d != 0]
    n = len(signs)
    if n == 0:
        return 1.0
    k = min(sum(d > 0 for d in signs), sum(d < 0 for d in signs))
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)
