"""Next-expert predictors: the rule, its fallback, and accuracy computed, not assumed."""

import random

import pytest

from readmoe.errors import ReadmoeError
from readmoe.serve.experts.predict import NextExpertPredictor, accuracy, make_predictor
from readmoe.serve.routing_sources import MarkovRouting
from readmoe.serve.types import UNKNOWN_EXPERT, Request, RequestState


def test_last_and_mode_rules():
    last, mode = make_predictor("last"), make_predictor("mode-3")
    assert last.predict_from([1, 2, 2, 5]) == 5
    assert mode.predict_from([1, 2, 2, 5]) == 2
    assert mode.predict_from([4, 1, 2]) == 2  # a three-way tie goes to the most recent
    assert last.predict_from([]) is None and mode.predict_from([UNKNOWN_EXPERT]) is None
    request = Request("r", 0.0, [3, 3], 9, output_experts=[1], num_computed=3,
                      state=RequestState.RUNNING)
    assert last.predict(request) == 1 and mode.predict(request) == 3
    assert (last.name, mode.name) == ("last", "mode-3")


def test_bad_rules_are_refused():
    for name in ("next", "mode-1", "mode-x"):
        with pytest.raises(ReadmoeError, match="unknown predictor"):
            make_predictor(name)
    with pytest.raises(ReadmoeError, match="window"):
        NextExpertPredictor(0)


def test_accuracy_counts_the_fed_back_outputs_only():
    # a prompt of 2 tokens, then the fed-back outputs 1, 1, 2, each predicted from its prefix
    result = accuracy(make_predictor("last"), [(2, [3, 1, 1, 1, 2])])
    assert result["predictions"] == 3  # positions 2, 3, 4
    assert result["accuracy"] == pytest.approx(2 / 3)  # the switch to 2 is missed
    assert accuracy(make_predictor("last"), [(5, [1, 2])])["accuracy"] is None


def test_accuracy_of_last_matches_markov_reuse():
    rng = random.Random(0)
    routing = MarkovRouting(6, reuse=0.7)
    sequences = [(4, routing.extend((), 300, rng)) for _ in range(20)]
    measured = accuracy(make_predictor("last"), sequences)["accuracy"]
    assert measured == pytest.approx(0.7, abs=0.03)
