"""The information measures on constructed sequences with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from readmoe.analysis import information as info


def test_identical_layers_share_all_their_information():
    x = np.random.default_rng(0).integers(0, 5, 10_000)
    assert info.mutual_information(x, x) == info.entropy(x)
    assert info.normalised_mutual_information(x, x) == pytest.approx(1.0, abs=1e-12)
    assert info.best_successor_share(x, x) == 1.0


def test_independent_uniform_layers_have_mi_near_zero():
    rng = np.random.default_rng(1)
    n = 200_000
    x, y = rng.integers(0, 4, n), rng.integers(0, 4, n)
    bias = info.independence_bias_bits(4, 4, n)  # 9 / (2 n ln 2) ~ 3e-5 bits
    mi = info.mutual_information(x, y, 4, 4)
    assert mi < 10 * bias < 1e-3  # 2 n ln2 * MI ~ chi2(9): 10x its mean is never reached
    assert info.normalised_mutual_information(x, y) < 1e-3
    assert info.entropy(x) == pytest.approx(2.0, abs=1e-3)


def test_a_permutation_between_layers_is_fully_predictable():
    rng = np.random.default_rng(2)
    x = rng.integers(0, 6, 5_000)
    y = np.array([3, 5, 0, 1, 4, 2])[x]
    assert info.normalised_mutual_information(x, y) == pytest.approx(1.0, abs=1e-12)
    assert info.best_successor_share(x, y) == 1.0
    counts, shares = info.transition_matrix(x, y, 6, 6)
    assert counts.sum() == 5_000 and counts[0, 3] == (x == 0).sum()
    np.testing.assert_allclose(shares.sum(axis=1), 1.0)
    assert shares[1, 5] == 1.0


def test_transition_counts_and_empty_rows():
    counts, shares = info.transition_matrix(np.array([0, 0, 0, 2]), np.array([1, 1, 0, 2]), 3, 3)
    assert counts.tolist() == [[1, 2, 0], [0, 0, 0], [0, 0, 1]]
    np.testing.assert_allclose(shares, [[1 / 3, 2 / 3, 0], [0, 0, 0], [0, 0, 1]])


def test_a_constant_target_is_fully_explained():
    x = np.array([0, 1, 2, 0, 1])
    y = np.zeros(5, dtype=np.int64)
    assert info.mutual_information(x, y) == 0.0
    assert info.normalised_mutual_information(x, y) == 1.0


def test_reuse_share_of_constant_and_alternating_sequences():
    assert info.reuse_share(np.zeros((3, 50), dtype=np.int64)) == 1.0
    alternating = np.tile([0, 1], (3, 25))
    assert info.reuse_share(alternating) == 0.0
    # sequences are independent: the boundary between two rows is no reuse opportunity
    assert info.reuse_share([np.array([0, 0]), np.array([1, 1, 1])]) == 1.0
    assert info.reuse_share([np.array([4])]) == 0.0


def test_reuse_distances():
    constant = info.reuse_distances(np.zeros((2, 10), dtype=np.int64), max_distance=4)
    assert constant.counts.tolist() == [18, 0, 0, 0] and constant.never == 2
    alternating = info.reuse_distances(np.tile([0, 1], (1, 5)), max_distance=4)
    assert alternating.counts.tolist() == [0, 8, 0, 0] and alternating.never == 2
    cycle = info.reuse_distances(np.array([[0, 1, 2, 3, 4, 0, 0]]), max_distance=3)
    assert (cycle.counts.tolist(), cycle.beyond, cycle.never) == ([1, 0, 0], 1, 5)
    shares = cycle.shares()
    assert list(shares) == ["1", "2", "3", "beyond", "never"]
    assert sum(shares.values()) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        info.reuse_distances(np.zeros((1, 3), dtype=np.int64), max_distance=0)


def test_usage_and_iid_baseline():
    labels = np.array([0, 0, 1, 3])
    np.testing.assert_allclose(info.expert_usage(labels, 4), [0.5, 0.25, 0, 0.25])
    assert info.iid_reuse_share(labels, 4) == pytest.approx(0.25 + 0.0625 + 0.0625)
    assert info.entropy(labels, 4) == pytest.approx(1.5)


def test_bad_labels_are_refused():
    with pytest.raises(ValueError, match="outside"):
        info.joint_counts(np.array([0, 5]), np.array([0, 1]), 3, 3)
    with pytest.raises(ValueError, match="non-negative"):
        info.entropy(np.array([-1, 0]))
    with pytest.raises(ValueError, match="length"):
        info.mutual_information(np.array([0, 1]), np.array([0]))
