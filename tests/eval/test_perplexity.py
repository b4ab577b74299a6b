from __future__ import annotations

import math

import torch

from readmoe.eval.perplexity import window_nll
from tests.conftest import tiny_model


def test_window_nll_matches_naive_per_position_loop():
    model = tiny_model()
    blocks = torch.randint(0, 128, (3, 10))
    result = window_nll(model, blocks, batch_size=2)
    total = 0.0
    with torch.no_grad():
        for row in blocks:
            logits = model(row[None]).logits[0]
            for pos in range(9):
                total -= torch.log_softmax(logits[pos], -1)[row[pos + 1]].item()
    assert result.tokens == 27
    assert math.isclose(result.nll_sum, total, rel_tol=1e-5)
    assert math.isclose(result.ppl, math.exp(total / 27), rel_tol=1e-5)


def test_random_model_perplexity_is_near_vocabulary_size():
    model = tiny_model()
    blocks = torch.randint(0, 128, (4, 32))
    assert 64 < window_nll(model, blocks).ppl < 256
