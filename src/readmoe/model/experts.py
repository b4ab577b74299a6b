"""The refactored FFN of one layer: a shared expert stored once plus E stacked routed experts.

This file is copied into every saved model folder next to modeling_readme.py
(``trust_remote_code``), so it imports only torch, transformers and its sibling files.
"""

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers.activations import ACT2FN

from .configuration_readme import ReadMEConfig


@dataclass
class ExpertGroups:
    """The tokens of one forward pass grouped by routed expert.

    With one expert per token for every layer the sort is done once per forward pass; with
    per-layer expert ids (layer-wise routing) once per layer.
    """

    order: torch.Tensor  # [N] int64: flat token positions, sorted by expert (stable)
    counts: list[int]  # [E]: tokens per expert, in expert order

    @classmethod
    def from_expert_ids(cls, expert_ids: torch.Tensor, num_experts: int) -> "ExpertGroups":
        flat = expert_ids.reshape(-1)  # [N]
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=num_experts).tolist()
        return cls(order=order, counts=counts)


class ReadMESharedExpert(nn.Module):
    """The layer's always-on SwiGLU channels, stored once (never copied into each expert)."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act_fn = ACT2FN[hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, H] -> [N, H]
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class ReadMEExperts(nn.Module):
    """E routed SwiGLU experts of equal width R, stacked so one layer is three tensors."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 hidden_act: str):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.up_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.act_fn = ACT2FN[hidden_act]

    def forward(self, x: torch.Tensor, groups: ExpertGroups,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        """x: [N, H] -> [N, H], each token through its own expert (weight 1, no gate), plus
        that expert's row of ``bias`` ([E, H]) when given."""
        grouped = x.index_select(0, groups.order)  # [N, H], tokens of expert 0 first
        outputs = []
        start = 0
        for expert, count in enumerate(groups.counts):
            if count == 0:
                continue
            tokens = grouped[start:start + count]  # [n, H]
            hidden = (self.act_fn(F.linear(tokens, self.gate_proj[expert]))
                      * F.linear(tokens, self.up_proj[expert]))  # [n, R]
            outputs.append(F.linear(hidden, self.down_proj[expert],
                                    None if bias is None else bias[expert]))  # [n, H]
            start += count
        # Every token has exactly one expert, so copying back fills every row.
        return torch.empty_like(x).index_copy(0, groups.order, torch.cat(outputs))


class ReadMEMoE(nn.Module):
    """One layer's FFN: shared expert (none if S_l = 0) + routed experts (none if R_l = 0).

    ``gate`` is the layer-wise router's linear gate, set by ReadMEModel when config.router_type
    is "layerwise" and the layer has routed experts; None otherwise. ``compensation`` (when
    config.compensation) is the mean output of the dense channels this FFN leaves out: a
    row per routed expert ([E, H]), or one row ([1, H]) when the layer has no routed part.
    """

    def __init__(self, config: ReadMEConfig, layer_idx: int):
        super().__init__()
        shared_size = config.shared_intermediate_sizes[layer_idx]
        expert_size = config.expert_intermediate_sizes[layer_idx]
        self.shared = (ReadMESharedExpert(config.hidden_size, shared_size, config.hidden_act)
                       if shared_size > 0 else None)
        self.experts = (ReadMEExperts(config.num_experts, config.hidden_size, expert_size,
                                      config.hidden_act)
                        if expert_size > 0 else None)
        self.gate: nn.Linear | None = None
        self.compensation = (nn.Parameter(torch.zeros(
            config.num_experts if expert_size > 0 else 1, config.hidden_size))
            if config.compensation else None)

    def forward(self, hidden_states: torch.Tensor, groups: ExpertGroups | None) -> torch.Tensor:
        shape = hidden_states.shape  # [B, T, H]
        flat = hidden_states.reshape(-1, shape[-1])  # [N, H]
        output = self.shared(flat) if self.shared is not None else None
        if self.experts is not None:
            routed = self.experts(flat, groups, self.compensation)
            output = routed if output is None else output + routed
        elif self.compensation is not None:
            output = output + self.compensation[0]
        return output.view(shape)


__all__ = ["ExpertGroups", "ReadMEExperts", "ReadMEMoE", "ReadMESharedExpert"]
