from __future__ import annotations

import torch

from readmoe.refactor.oracle import OracleRouter
from readmoe.refactor.plan import ExpertPlan, LayerPlan
from tests.conftest import tiny_model


def make_plan(size=128, layers=2, experts=3, expert_size=20) -> ExpertPlan:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(layers):
        perm = torch.randperm(size, generator=gen)
        shared = perm[:30].sort().values
        routed = torch.stack([perm[30 + e * expert_size: 30 + (e + 1) * expert_size].sort().values
                              for e in range(experts)])
        rows.append(LayerPlan(shared, routed))
    return ExpertPlan("random", "m", [f"e{i}" for i in range(experts)], size, 0.5, rows)


def test_oracle_scores_match_a_per_token_reference():
    model, plan = tiny_model(), make_plan()
    ids = torch.randint(0, 128, (2, 9))
    router = OracleRouter(model, plan)
    scores = router.layer_scores(ids)  # [B, T, L, E]
    acts = {}
    handles = [layer.mlp.down_proj.register_forward_pre_hook(
        lambda _m, a, i=i: acts.__setitem__(i, a[0])) for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    for b in range(2):
        for t in range(9):
            for layer in range(2):
                top = set(acts[layer][b, t].abs().topk(64).indices.tolist())
                for e in range(3):
                    expected = len(top & set(plan.layers[layer].experts[e].tolist()))
                    assert scores[b, t, layer, e] == expected
    assert torch.equal(router.expert_ids(ids), scores.sum(2).argmax(-1))
