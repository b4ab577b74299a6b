from __future__ import annotations

from readmoe.eval.router_cost import router_share
from tests.model.test_modeling_readme import tiny_readme


def test_router_share_times_both_parts_of_a_decode_step():
    model = tiny_readme(seed=0)
    model.attach_router("pregating", seed=0)
    model.eval()
    result = router_share(model, batch_size=2, prompt_len=8, steps=4)
    assert result["router_ms"] > 0 and result["backbone_ms"] > 0
    assert 0 < result["share"] < 1
    assert result["router_parameters"] == sum(p.numel() for p in model.router_parameters())
