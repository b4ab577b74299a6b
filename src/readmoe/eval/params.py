"""Total and active parameters: what a token touches is the honest measure of an MoE's cost.

Active = every parameter except the routed experts, plus one routed expert per layer (top-1).
The pre-gating router counts as active (it runs for every token), the embedding too (one row
is read, but it is counted whole, as the paper and most MoE papers do).
"""

from __future__ import annotations


def parameter_counts(model) -> dict:
    total = sum(p.numel() for p in model.parameters())
    config = model.config
    if getattr(config, "model_type", None) != "readme":
        return {"total": total, "active": total, "router": 0}
    routed = 0
    one_expert = 0
    for layer in model.model.layers:
        experts = getattr(layer.mlp, "experts", None)
        if experts is None:
            continue
        size = sum(p.numel() for p in experts.parameters())
        routed += size
        one_expert += size // config.num_experts
    router = sum(p.numel() for p in model.router_parameters())
    return {"total": total, "active": total - routed + one_expert, "router": router}
