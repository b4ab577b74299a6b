"""Sampling: greedy, seeded reproducibility, top-p, stop-string search, validation."""

from __future__ import annotations

import pytest
import torch

from readmoe.errors import ReadmoeError
from readmoe.serve.sampling import SamplingParams, find_stop, sample


def logits(rows: int = 3, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed))


def test_greedy_is_argmax():
    x = logits()
    params = [SamplingParams()] * 3
    assert sample(x, params, [p.generator() for p in params]) == x.argmax(-1).tolist()


def test_seeded_draws_repeat_and_ignore_other_rows():
    x = logits()
    params = [SamplingParams(temperature=1.0, seed=7)] * 3
    draws = []
    for rows in ([0], [0, 1, 2]):
        generator = params[0].generator()
        others = [p.generator() for p in params[1:len(rows)]]
        draws.append([sample(x[rows], params[:len(rows)], [generator, *others])[0]
                      for _ in range(5)])
    assert draws[0] == draws[1]
    assert len(set(draws[0])) > 1  # really random across steps


def test_tiny_top_p_keeps_only_the_best_token():
    x = logits()
    params = [SamplingParams(temperature=2.0, top_p=1e-6, seed=s) for s in range(3)]
    assert sample(x, params, [p.generator() for p in params]) == x.argmax(-1).tolist()


def test_find_stop():
    assert find_stop("hello world", ["wor", "o"]) == 4
    assert find_stop("hello world", ["o"], search_from=5) == 7
    assert find_stop("hello", ["x"]) is None


@pytest.mark.parametrize("fields", [dict(max_tokens=0), dict(temperature=-1.0),
                                    dict(top_p=0.0), dict(stop=[""])])
def test_bad_params_are_refused(fields):
    with pytest.raises(ReadmoeError):
        SamplingParams(**fields)
