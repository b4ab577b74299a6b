"""The oracle router: each token's expert read off the dense model's own activations.

For every token and layer, M0 = the token's top-k channels by |down_proj input| (k = the
domain-mask size, round(keep * I)). Expert j scores |M0 ∩ routed channels of j| at that
layer; the per-layer scores are the distillation targets of the paper, and their sum over
layers picks the oracle expert (ties to the lower index). It needs the dense model, so it is
an upper bound for analysis, not a deployable router.
"""

from __future__ import annotations

import torch

from readmoe.errors import ReadmoeError
from readmoe.refactor.hooks import capture_ffn_inputs
from readmoe.refactor.plan import ExpertPlan


class OracleRouter:
    def __init__(self, dense_model, plan: ExpertPlan, top_k: int | None = None) -> None:
        config = dense_model.config
        if config.num_hidden_layers != plan.num_layers:
            raise ReadmoeError(f"plan has {plan.num_layers} layers, dense model "
                               f"{config.num_hidden_layers}")
        if config.intermediate_size != plan.intermediate_size:
            raise ReadmoeError(f"plan is for FFN width {plan.intermediate_size}, dense model "
                               f"has {config.intermediate_size}")
        self.model = dense_model
        self.plan = plan
        self.top_k = top_k or round(plan.keep * plan.intermediate_size)
        # membership[l]: [I, E] float, 1 where channel i belongs to routed expert e
        self.membership = []
        for lp in plan.layers:
            member = torch.zeros(plan.intermediate_size, plan.num_experts)
            for e in range(plan.num_experts):
                member[lp.experts[e], e] = 1.0
            self.membership.append(member)

    @torch.no_grad()
    def layer_scores(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Overlap scores `[batch, seq, L, E]` of each token's top channels with each expert
        (fp32, on the dense model's device)."""
        scores: dict[int, torch.Tensor] = {}

        def sink(layer: int, act: torch.Tensor) -> None:  # act: [B, T, I]
            top = act.abs().topk(self.top_k, dim=-1, sorted=False).indices  # [B, T, k]
            # counts up to k: fp32, since bf16 holds integers exactly only up to 256
            mask = torch.zeros(act.shape, device=act.device).scatter_(-1, top, 1.0)  # [B, T, I]
            scores[layer] = mask @ self.membership[layer].to(act.device)  # [B, T, E]

        backbone = getattr(self.model, "model", self.model)
        device = next(self.model.parameters()).device
        with capture_ffn_inputs(self.model, sink):
            backbone(input_ids=input_ids.to(device))
        return torch.stack([scores[layer] for layer in sorted(scores)], dim=2)

    def expert_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The oracle expert of every token: `[batch, seq]` int64."""
        return self.layer_scores(input_ids).sum(dim=2).argmax(dim=-1)
