"""Compensation biases for the channels a refactored FFN drops (as FLAP does for pruning).

A token whose FFN keeps the shared channels S and its expert's channels R_e loses the dense
output ``W_down[:, D] a_D(x)`` of the other channels D. Its mean over the calibration tokens,
``W_down[:, D] E[a_D]``, is a constant vector, so folding it in as an output bias removes the
mean error of the drop at no cost per token. The signed means come from the statistics.
"""

from __future__ import annotations

import torch

from readmoe.errors import ReadmoeError
from readmoe.refactor.plan import ExpertPlan
from readmoe.refactor.stats import ActivationStats


def require_signed_means(stats: ActivationStats, domains: list[str]) -> None:
    """Refuse statistics made before signed means were recorded, naming the fix."""
    missing = [d for d in domains if d not in stats.mean]
    if missing:
        raise ReadmoeError(f"the statistics hold no signed means for {', '.join(missing)} "
                           "(computed by an older readmoe); recompute them with "
                           "--recompute-stats to use --compensate")


def compensation_biases(dense, plan: ExpertPlan, stats: ActivationStats) -> list[torch.Tensor]:
    """Per layer ``[E, H]``, a bias per routed expert, or ``[1, H]`` in a layer without a
    routed part (the prune baseline's per-layer bias), in the dense model's dtype.

    An expert named after a calibration domain (the readme planner's) is measured on that
    domain's tokens, the tokens its router sends it; other experts (cluster, random) and
    layers without routed experts on all calibration tokens together."""
    require_signed_means(stats, stats.domains)
    overall = stats.token_weighted_mean()  # [L, I]
    per_expert = [stats.mean[name].double() if name in stats.mean else overall
                  for name in plan.expert_names]
    biases = []
    for index, lp in enumerate(plan.layers):
        weight = dense.model.layers[index].mlp.down_proj.weight  # [H, I]
        down = weight.detach().double().cpu()
        rows = []
        for expert in range(plan.num_experts) if lp.expert_size else [None]:
            kept = lp.shared if expert is None else torch.cat([lp.shared, lp.experts[expert]])
            dropped = torch.ones(plan.intermediate_size, dtype=torch.bool)
            dropped[kept] = False
            mean = (overall if expert is None else per_expert[expert])[index]  # [I]
            rows.append(down[:, dropped] @ mean[dropped])  # [H]
        biases.append(torch.stack(rows).to(weight.dtype))
    return biases
