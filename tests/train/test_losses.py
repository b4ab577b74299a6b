from __future__ import annotations

import math

import torch

from readmoe.train.data import BlockSchedule
from readmoe.train.losses import (
    RouterLossConfig,
    lm_loss,
    logit_kl,
    router_distillation_loss,
)


def naive_router_loss(logits, scores, sizes, cfg):
    total = 0.0
    for n in range(logits.shape[0]):
        logp = torch.log_softmax(logits[n], -1)
        for layer, size in enumerate(sizes):
            if size == 0:
                continue
            f = scores[n, layer].float() / size
            soft = torch.softmax(cfg.scale * (f - f.mean()), -1)
            e = logits.shape[-1]
            hard = torch.full((e,), cfg.label_smoothing / e)
            hard[int(f.argmax())] += 1 - cfg.label_smoothing
            total += cfg.hard_weight * -(hard * logp).sum() + cfg.soft_weight * -(soft * logp).sum()
    return total / logits.shape[0]


def test_router_loss_matches_naive_per_token_layer_loop():
    torch.manual_seed(0)
    logits = torch.randn(7, 4)
    scores = torch.randint(0, 20, (7, 3, 4), dtype=torch.int32)
    sizes = [20, 0, 16]
    cfg = RouterLossConfig()
    got = router_distillation_loss(logits, scores, sizes, cfg)
    torch.testing.assert_close(got, naive_router_loss(logits, scores, sizes, cfg))


def test_layerwise_logits_take_their_own_layer_target():
    torch.manual_seed(1)
    scores = torch.randint(0, 10, (5, 2, 3), dtype=torch.int32)
    shared = torch.randn(5, 3)
    per_layer = shared[:, None, :].expand(5, 2, 3)
    sizes = [10, 10]
    torch.testing.assert_close(router_distillation_loss(per_layer, scores, sizes),
                               router_distillation_loss(shared, scores, sizes))


def test_router_loss_is_minimised_by_the_target_expert():
    scores = torch.tensor([[[9, 1, 0]]], dtype=torch.int32)
    good = router_distillation_loss(torch.tensor([[5.0, 0.0, 0.0]]), scores, [10])
    bad = router_distillation_loss(torch.tensor([[0.0, 5.0, 0.0]]), scores, [10])
    assert good < bad


def test_lm_loss_and_kl():
    logits = torch.zeros(1, 4, 10)
    ids = torch.tensor([[1, 2, 3, 4]])
    assert math.isclose(float(lm_loss(logits, ids)), math.log(10), rel_tol=1e-6)
    assert float(logit_kl(logits, logits)) == 0.0
    assert float(logit_kl(torch.randn(1, 4, 10), logits)) > 0


def test_block_schedule_advances_and_wraps():
    blocks = torch.arange(10)[:, None].repeat(1, 3)
    schedule = BlockSchedule(blocks, 4)
    assert schedule.indices(0).tolist() == [0, 1, 2, 3]
    assert schedule.indices(2).tolist() == [8, 9, 0, 1]
    assert schedule.batch(1)[:, 0].tolist() == [4, 5, 6, 7]
