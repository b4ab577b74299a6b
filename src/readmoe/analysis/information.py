"""Information measures over routing choices: the numbers behind the paper's two arguments.

Read-ME's case for ONE pre-gating router rests on two observations (paper, section 1):
layer-wise routers are redundant (the expert at layer l is nearly determined by the one at
layer l-1), and a token often reuses the previous token's expert (temporal locality, which
makes caching and prefetching pay). Everything here is a pure function of integer label
arrays, so it is tested on constructed sequences and shared by every router under study.

Definitions (our choices where the paper is silent):

- Entropies and mutual information are plug-in estimates from counts, in bits.
- Normalised MI of a source X and a target Y is ``I(X;Y) / H(Y) = 1 - H(Y|X) / H(Y)``: the
  fraction of the target's uncertainty that the source removes (1: Y is a function of X,
  0: independent). A constant target has nothing left to explain, so it scores 1.
- Reuse share: among tokens that have a predecessor in their sequence, the share whose
  expert equals the predecessor's (the paper: 2921 of 4096 tokens for Read-ME).
- Reuse distance of a token: how many positions back, in the same sequence, the last token
  with the same expert lies (1 = the previous token); "never" when no earlier token in the
  sequence used that expert (always the case for a sequence's first token).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Sequences = np.ndarray | Sequence[np.ndarray]  # [S, T] or a list of 1-D label arrays


def _labels(values: np.ndarray, num_labels: int | None, what: str) -> tuple[np.ndarray, int]:
    values = np.asarray(values).reshape(-1)
    if values.size and (values.dtype.kind not in "iu" or int(values.min()) < 0):
        raise ValueError(f"{what} must be non-negative integer labels")
    needed = int(values.max()) + 1 if values.size else 0
    if num_labels is None:
        num_labels = max(needed, 1)
    elif needed > num_labels:
        raise ValueError(f"{what} holds label {needed - 1}, outside [0, {num_labels})")
    return values, num_labels


def joint_counts(x: np.ndarray, y: np.ndarray, num_x: int | None = None,
                 num_y: int | None = None) -> np.ndarray:
    """Counts ``[num_x, num_y]`` of the pairs (x_i, y_i): a transition or confusion matrix."""
    x, num_x = _labels(x, num_x, "x")
    y, num_y = _labels(y, num_y, "y")
    if x.shape != y.shape:
        raise ValueError(f"paired labels differ in length: {x.size} and {y.size}")
    return np.bincount(x * num_y + y, minlength=num_x * num_y).reshape(num_x, num_y)


def row_shares(counts: np.ndarray) -> np.ndarray:
    """Each row divided by its sum (P(y | x)); an empty row stays all zeros."""
    counts = np.asarray(counts, dtype=np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


def transition_matrix(x: np.ndarray, y: np.ndarray, num_x: int | None = None,
                      num_y: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(counts, row-normalised shares) of the transitions x_i -> y_i."""
    counts = joint_counts(x, y, num_x, num_y)
    return counts, row_shares(counts)


def entropy_of_counts(counts: np.ndarray) -> float:
    """Entropy in bits of the distribution proportional to ``counts`` (any shape)."""
    counts = np.asarray(counts, dtype=np.float64).reshape(-1)
    total = counts.sum()
    if total <= 0:
        return 0.0
    p = counts[counts > 0] / total
    return float(max(0.0, -(p * np.log2(p)).sum()))


def entropy(labels: np.ndarray, num_labels: int | None = None) -> float:
    """Entropy in bits of the empirical distribution of ``labels``."""
    labels, num_labels = _labels(labels, num_labels, "labels")
    return entropy_of_counts(np.bincount(labels, minlength=num_labels))


def mutual_information(x: np.ndarray, y: np.ndarray, num_x: int | None = None,
                       num_y: int | None = None) -> float:
    """I(X;Y) = H(X) + H(Y) - H(X,Y) in bits, from paired labels."""
    counts = joint_counts(x, y, num_x, num_y)
    value = (entropy_of_counts(counts.sum(axis=1)) + entropy_of_counts(counts.sum(axis=0))
             - entropy_of_counts(counts))
    return max(0.0, value)


def normalised_mutual_information(x: np.ndarray, y: np.ndarray, num_x: int | None = None,
                                  num_y: int | None = None) -> float:
    """I(X;Y) / H(Y), Y the target (see the module docstring); 1 for a constant target."""
    counts = joint_counts(x, y, num_x, num_y)
    h_y = entropy_of_counts(counts.sum(axis=0))
    if h_y == 0.0:
        return 1.0
    h_x = entropy_of_counts(counts.sum(axis=1))
    return float(min(1.0, max(0.0, (h_x + h_y - entropy_of_counts(counts)) / h_y)))


def best_successor_share(x: np.ndarray, y: np.ndarray, num_x: int | None = None,
                         num_y: int | None = None) -> float:
    """Share of pairs whose y is the most frequent y for their x: how often the best fixed
    rule "x -> y" is right (the paper's "70% of tokens that pick A at layer 30 pick B at 31")."""
    counts = joint_counts(x, y, num_x, num_y)
    total = counts.sum()
    return float(counts.max(axis=1).sum() / total) if total else 0.0


def independence_bias_bits(num_x: int, num_y: int, samples: int) -> float:
    """Expected plug-in MI of two INDEPENDENT variables, (|X|-1)(|Y|-1) / (2 N ln 2) bits
    (Miller-Madow): the noise floor below which a measured MI means nothing."""
    if samples <= 0:
        return 0.0
    return (num_x - 1) * (num_y - 1) / (2.0 * samples * math.log(2.0))


def expert_usage(labels: np.ndarray, num_experts: int) -> np.ndarray:
    """Share of tokens routed to each expert, ``[num_experts]``."""
    labels, num_experts = _labels(labels, num_experts, "expert labels")
    counts = np.bincount(labels, minlength=num_experts).astype(np.float64)
    return counts / counts.sum() if counts.sum() else counts


def _rows(sequences: Sequences) -> list[np.ndarray]:
    return [np.asarray(row).reshape(-1) for row in sequences]


def reuse_share(sequences: Sequences) -> float:
    """Share of tokens with a predecessor in their sequence that reuse its expert."""
    reused = pairs = 0
    for row in _rows(sequences):
        if row.size > 1:
            reused += int((row[1:] == row[:-1]).sum())
            pairs += row.size - 1
    return reused / pairs if pairs else 0.0


def iid_reuse_share(labels: np.ndarray, num_experts: int) -> float:
    """The reuse share if every token drew its expert independently from the usage
    distribution: sum_e p_e^2, the baseline a real locality must beat."""
    usage = expert_usage(labels, num_experts)
    return float((usage**2).sum())


@dataclass
class ReuseHistogram:
    """Reuse distances of all tokens: ``counts[d - 1]`` tokens at distance d for
    d = 1..max_distance, ``beyond`` farther back, ``never`` with no earlier use."""

    counts: np.ndarray
    beyond: int
    never: int

    @property
    def total(self) -> int:
        return int(self.counts.sum()) + self.beyond + self.never

    def shares(self) -> dict[str, float]:
        """Bucket -> share of all tokens; keys "1".."max_distance", "beyond", "never"."""
        total = self.total or 1
        buckets = {str(d + 1): int(c) for d, c in enumerate(self.counts)}
        buckets.update(beyond=self.beyond, never=self.never)
        return {key: value / total for key, value in buckets.items()}


def reuse_distances(sequences: Sequences, max_distance: int = 16) -> ReuseHistogram:
    """Histogram of every token's reuse distance (see the module docstring)."""
    if max_distance < 1:
        raise ValueError(f"max_distance must be at least 1, got {max_distance}")
    counts = np.zeros(max_distance, dtype=np.int64)
    beyond = never = 0
    for row in _rows(sequences):
        last: dict[int, int] = {}
        for position, label in enumerate(row.tolist()):
            previous = last.get(label)
            if previous is None:
                never += 1
            elif position - previous <= max_distance:
                counts[position - previous - 1] += 1
            else:
                beyond += 1
            last[label] = position
    return ReuseHistogram(counts, beyond, never)
