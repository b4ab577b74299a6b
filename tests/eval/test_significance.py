import math
import random

import pytest

from readmoe.eval.significance import (
    Difference,
    average_difference,
    mean_stderr,
    paired_difference,
    sign_test,
)


def test_mean_stderr_matches_the_textbook_formula():
    values = [1.0, 0.0, 1.0, 1.0, 0.0, 1.0]
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    assert mean_stderr(values) == pytest.approx(math.sqrt(var / len(values)))
    with pytest.raises(ValueError, match="at least 2"):
        mean_stderr([1.0])


def test_paired_difference_against_a_naive_reference():
    rng = random.Random(0)
    a = [float(rng.random() < 0.6) for _ in range(500)]
    b = [float(rng.random() < 0.5) for _ in range(500)]
    diff = paired_difference(a, b)
    d = [x - y for x, y in zip(a, b, strict=True)]
    mean = sum(d) / len(d)
    se = math.sqrt(sum((v - mean) ** 2 for v in d) / (len(d) - 1) / len(d))
    assert diff.mean == pytest.approx(mean) and diff.stderr == pytest.approx(se)
    assert diff.z == pytest.approx(mean / se)
    # two-sided normal p: 1 - erf(|z| / sqrt 2)
    assert diff.p == pytest.approx(1 - math.erf(abs(mean / se) / math.sqrt(2)))
    assert diff.n == 500


def test_pairing_sees_a_shared_gap_that_independent_errors_would_miss():
    # b gets right exactly what a gets right, minus 15 of the 500 items
    a = [1.0] * 250 + [0.0] * 250
    b = [1.0] * 235 + [0.0] * 265
    diff = paired_difference(a, b)
    unpaired = math.hypot(mean_stderr(a), mean_stderr(b))
    assert diff.significant() and abs(diff.mean / unpaired) < 1.96


def test_identical_scores_are_not_significant_and_lengths_must_match():
    same = paired_difference([1.0, 0.0, 1.0], [1.0, 0.0, 1.0])
    assert same.z == 0.0 and same.p == 1.0 and not same.significant()
    with pytest.raises(ValueError, match="same items"):
        paired_difference([1.0, 0.0], [1.0])


def test_average_difference_combines_independent_tasks():
    avg = average_difference([Difference(0.02, 0.01, 500), Difference(0.04, 0.02, 300)])
    assert avg.mean == pytest.approx(0.03)
    assert avg.stderr == pytest.approx(math.sqrt(0.01 ** 2 + 0.02 ** 2) / 2)
    assert avg.n == 800
    assert avg.as_dict()["significant"] == avg.significant()
    with pytest.raises(ValueError):
        average_difference([])


def _naive_sign_p(differences):
    """Enumerate every sign pattern of the non-zero differences and add the probability of
    those at least as extreme as the observed count of positives."""
    import itertools

    signs = [d > 0 for d in differences if d != 0]
    n = len(signs)
    observed = abs(sum(signs) - n / 2)
    extreme = sum(abs(sum(p) - n / 2) >= observed for p in itertools.product([0, 1], repeat=n))
    return extreme / 2 ** n


@pytest.mark.parametrize("differences", [
    [1.0] * 7, [-0.2, 0.1, -0.3], [1, -1, 1, -1, 2], [0.0, 0.5, 0.5, 0.5, -0.1, 0.2],
    [3, 1, 2, 1, -1, 1, 1, 1]])
def test_sign_test_matches_enumeration(differences):
    assert sign_test(differences) == pytest.approx(_naive_sign_p(differences))


def test_sign_test_values():
    assert sign_test([0.1] * 7) == pytest.approx(2 / 128)
    assert sign_test([0.0, 0.0]) == 1.0
    assert sign_test([1.0, -1.0]) == 1.0
