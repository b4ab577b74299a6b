"""One ReadME layer's FFN on vLLM: the shared expert as a dense gated MLP, the routed experts
through vLLM's fused MoE layer with top-1 routing taken from the router.

A token's FFN output is ``shared(x) + routed_e(x)`` with weight 1 (the refactor has no gate
scale), e = the arg-max of the router's logits: the pre-gating router's (computed once per step
for all layers) or, for a layer-wise folder, this layer's own linear gate over the FFN input.
Routed-expert sizes differ from layer to layer, so each layer builds its own fused MoE. With
both parts the shared MLP is handed to the fused MoE layer, which adds it to the routed output
and, under tensor parallelism, all-reduces the sum once. Under tensor parallelism both parts
are split over the ranks by channel, their sizes zero-padded to a multiple of the ranks
(``config.padded``: exact).
"""

from __future__ import annotations

import torch
from torch import nn
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.fused_moe import FusedMoEFactory
from vllm.model_executor.layers.linear import ReplicatedLinear
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.models.llama import LlamaMLP

from readmoe.integrations.vllm.config import padded


def top1_unweighted(hidden_states: torch.Tensor, gating_output: torch.Tensor, topk: int,
                    renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """ReadME's routing for vLLM's fused MoE: the arg-max expert of each token, weight 1."""
    ids = gating_output.argmax(dim=-1, keepdim=True).to(torch.int32)  # [N, 1]
    return torch.ones(ids.shape, dtype=torch.float32, device=ids.device), ids


class ReadMEFFN(nn.Module):
    """Layer ``layer``'s FFN; ``shared`` and ``experts`` are None where its size is 0."""

    def __init__(self, config, layer: int, quant_config: QuantizationConfig | None,
                 prefix: str) -> None:
        super().__init__()
        tp_size = get_tensor_model_parallel_world_size()
        shared_size = config.shared_intermediate_sizes[layer]
        routed_size = config.expert_intermediate_sizes[layer]
        hidden = config.hidden_size
        self.shared = (LlamaMLP(hidden, padded(shared_size, tp_size), config.hidden_act,
                                quant_config=quant_config, prefix=f"{prefix}.shared",
                                reduce_results=routed_size == 0)
                       if shared_size else None)
        self.gate = (ReplicatedLinear(hidden, config.num_experts, bias=False,
                                      prefix=f"{prefix}.gate")
                     if config.router_type == "layerwise" and routed_size else None)
        self.experts = (FusedMoEFactory(
            num_experts=config.num_experts, top_k=1, hidden_size=hidden,
            intermediate_size=padded(routed_size, tp_size), renormalize=False,
            quant_config=quant_config, prefix=f"{prefix}.experts",
            custom_routing_function=top1_unweighted, shared_experts=self.shared)
            if routed_size else None)

    def forward(self, hidden_states: torch.Tensor,
                router_logits: torch.Tensor | None) -> torch.Tensor:
        """hidden_states [N, H]; router_logits [N, E] from the pre-gating router (None for a
        layer-wise folder, whose gate computes them here, or a layer without routed part)."""
        if self.experts is None:
            return self.shared(hidden_states)
        if self.gate is not None:
            router_logits, _ = self.gate(hidden_states)
        return self.experts(hidden_states=hidden_states, router_logits=router_logits)
