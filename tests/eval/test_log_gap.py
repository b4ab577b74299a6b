"""The quality issue's measure: mean log-perplexity gap over the reference's domains."""

import math

import pytest

from readmoe.eval.domains import log_gap


def test_log_gap_is_the_mean_log_ratio_over_the_reference_domains():
    dense = {"domains": {"a": {"ppl": 10.0}, "b": {"ppl": 20.0}}}
    model = {"domains": {"a": {"ppl": 20.0}, "b": {"ppl": 20.0}, "extra": {"ppl": 1e9}}}
    assert log_gap(model, dense) == pytest.approx((math.log(2.0) + 0.0) / 2)
    assert log_gap(dense, dense) == 0.0
