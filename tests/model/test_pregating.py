from __future__ import annotations

import math

import pytest
import torch

from readmoe.model.pregating import (
    PreGatingRouter,
    RouterCache,
    default_router_dim,
    sticky_argmax,
)


def make_router(seed=0, **kw) -> PreGatingRouter:
    torch.manual_seed(seed)
    return PreGatingRouter(vocab_size=50, num_experts=5, dim=32, heads=4, **kw).eval()


@pytest.mark.parametrize("layers", [1, 2])
def test_incremental_decoding_equals_full_recompute(layers):
    router = make_router(layers=layers)
    ids = torch.randint(0, 50, (3, 12))
    full = router(ids)
    cache = RouterCache()
    pieces = [router(ids[:, :5], cache)]  # a prompt, then one token at a time
    for t in range(5, 12):
        pieces.append(router(ids[:, t : t + 1], cache))
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-6)
    assert cache.length == 12


def test_router_is_causal():
    router = make_router()
    ids = torch.randint(0, 50, (1, 10))
    changed = ids.clone()
    changed[0, 7] = (changed[0, 7] + 1) % 50
    a, b = router(ids), router(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_attention_uses_inverse_sqrt_head_dim_scale():
    router = make_router()
    block = router.blocks[0]
    x = torch.randn(1, 6, 32)
    positions = torch.arange(6)
    out = block(x, positions, 0, None)
    # naive reference with an explicit softmax(q k^T / sqrt(d)) and causal mask
    from readmoe.model.pregating import rotary

    q, k, v = block.qkv(block.attn_norm(x)).split(32, dim=-1)
    q, k, v = (t.view(1, 6, 4, 8).transpose(1, 2) for t in (q, k, v))
    q, k = rotary(q, positions, block.theta), rotary(k, positions, block.theta)
    scores = q @ k.transpose(-1, -2) / math.sqrt(8)
    scores = scores.masked_fill(torch.triu(torch.ones(6, 6, dtype=torch.bool), 1), -math.inf)
    attn = (scores.softmax(-1) @ v).transpose(1, 2).reshape(1, 6, 32)
    h = x + block.out(attn)
    m = block.mlp_norm(h)
    expected = h + block.down(torch.nn.functional.silu(block.gate(m)) * block.up(m))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_embedding_init_keeps_backbone_geometry():
    router = make_router()
    backbone = torch.randn(50, 8) @ torch.randn(8, 64)  # rank-8 embedding, width 64
    router.init_embedding_from(backbone)
    table = router.embed.weight.detach()
    centred = backbone - backbone.mean(0)
    # a projection onto the top principal directions preserves pairwise distances (rank 8 < 32)
    scale = (torch.cdist(table, table) / torch.cdist(centred, centred).clamp_min(1e-6))
    off_diag = scale[~torch.eye(50, dtype=torch.bool)]
    assert float(off_diag.std() / off_diag.mean()) < 1e-3


def test_default_dims_are_proportionate():
    assert default_router_dim(4096) == 512
    assert default_router_dim(576) == 128
    assert default_router_dim(64) == 64


def naive_sticky(logits, margin, previous=None, valid=None):
    """The hysteresis rule written out token by token, row by row."""
    batch, steps, _ = logits.shape
    out = []
    for b in range(batch):
        carried = None if previous is None or previous[b] < 0 else int(previous[b])
        row = []
        for t in range(steps):
            scores = logits[b, t].tolist()
            best = max(range(len(scores)), key=lambda e: (scores[e], -e))
            real = valid is None or bool(valid[b, t])
            pick = best
            if real and carried is not None and scores[carried] >= scores[best] - margin:
                pick = carried
            if real:
                carried = pick
            row.append(pick)
        out.append(row)
    return torch.tensor(out)


@pytest.mark.parametrize("margin", [0.0, 0.3, 1.0])
def test_sticky_argmax_equals_a_naive_scan(margin):
    logits = torch.randn(3, 20, 5, generator=torch.Generator().manual_seed(1))
    previous = torch.tensor([2, -1, 0])
    valid = torch.ones(3, 20, dtype=torch.bool)
    valid[1, :4] = False  # a left-padded row
    for args in ((), (previous,), (previous, valid), (None, valid)):
        expected = naive_sticky(logits, margin, *args)
        assert torch.equal(sticky_argmax(logits, margin, *args), expected)
    plain = logits.argmax(-1)
    assert torch.equal(sticky_argmax(logits, 0.0), plain)
    switches = (sticky_argmax(logits, margin)[:, 1:] != sticky_argmax(logits, margin)[:, :-1])
    if margin:  # the rule keeps experts the argmax would have switched away from
        assert switches.sum() < (plain[:, 1:] != plain[:, :-1]).sum()


def test_sticky_argmax_padding_hands_nothing_on():
    logits = torch.randn(1, 6, 4, generator=torch.Generator().manual_seed(2))
    padded = torch.cat([torch.randn(1, 3, 4), logits], dim=1)
    valid = torch.tensor([[False] * 3 + [True] * 6])
    assert torch.equal(sticky_argmax(padded, 0.8, valid=valid)[:, 3:], sticky_argmax(logits, 0.8))
