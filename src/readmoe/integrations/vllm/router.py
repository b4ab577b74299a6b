"""The pre-gating router on vLLM: the step's token ids -> expert logits, with its own KV cache.

The same network as ``readmoe.model.pregating.PreGatingRouter`` (its weights load unchanged):
an embedding, ``router_layers`` pre-norm blocks (RMSNorm, causal attention with RoPE, SwiGLU),
RMSNorm and a linear head. Each block's attention is a vLLM ``Attention`` layer, so vLLM's KV
cache manager gives it pages like any other layer (2 x router_dim values per token; beside a
full-attention backbone one more layer in the backbone's cache group, whatever its head size,
beside a sliding-window backbone a group of its own). A decode step therefore routes its new token
with one token's projections and one attention row against the cached keys, never a rerun of
the prefix; chunked prefill routes a prompt chunk by chunk; prefix caching and preemption keep
the router's cache in step with the backbone's because they share blocks.

The router runs once per model step, before the backbone, on every scheduled token; its
logits serve every layer (each takes the arg-max). It is tiny, so under tensor parallelism
every rank runs all of it (replicated weights, no communication) and every rank routes alike.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from vllm.config import CacheConfig
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import ReplicatedLinear
from vllm.model_executor.layers.rotary_embedding import get_rope


def full_attention(cache_config: CacheConfig | None) -> CacheConfig | None:
    """``cache_config`` without a model-wide sliding window: vLLM applies
    ``cache_config.sliding_window`` to every attention layer that names none of its own, but
    the router attends to the whole prefix whatever the backbone does."""
    if cache_config is None or cache_config.sliding_window is None:
        return cache_config
    full = copy.copy(cache_config)
    full.sliding_window = None
    return full


class RouterBlock(nn.Module):
    """One pre-norm transformer block of the router (``pregating.RouterBlock``)."""

    def __init__(self, config, cache_config: CacheConfig | None, prefix: str) -> None:
        super().__init__()
        dim, heads, mlp_dim = config.router_dim, config.router_heads, config.router_mlp_dim
        self.dim, self.head_dim = dim, dim // heads
        self.attn_norm = RMSNorm(dim, eps=config.rms_norm_eps)
        self.qkv = ReplicatedLinear(dim, 3 * dim, bias=False, prefix=f"{prefix}.qkv")
        self.rotary_emb = get_rope(
            self.head_dim, max_position=config.max_position_embeddings, is_neox_style=True,
            rope_parameters={"rope_type": "default", "rope_theta": config.router_rope_theta})
        self.attn = Attention(heads, self.head_dim, self.head_dim ** -0.5, num_kv_heads=heads,
                              cache_config=full_attention(cache_config),
                              prefix=f"{prefix}.attn")
        self.out = ReplicatedLinear(dim, dim, bias=False, prefix=f"{prefix}.out")
        self.mlp_norm = RMSNorm(dim, eps=config.rms_norm_eps)
        self.gate = ReplicatedLinear(dim, mlp_dim, bias=False, prefix=f"{prefix}.gate")
        self.up = ReplicatedLinear(dim, mlp_dim, bias=False, prefix=f"{prefix}.up")
        self.down = ReplicatedLinear(mlp_dim, dim, bias=False, prefix=f"{prefix}.down")

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x: [N, dim] for the step's N tokens at ``positions`` [N] -> [N, dim]."""
        qkv, _ = self.qkv(self.attn_norm(x))
        q, k, v = qkv.split(self.dim, dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        attended, _ = self.out(self.attn(q, k, v))
        x = x + attended
        h = self.mlp_norm(x)
        gate, _ = self.gate(h)
        up, _ = self.up(h)
        down, _ = self.down(F.silu(gate) * up)
        return x + down


class PreGatingRouter(nn.Module):
    """Token ids [N] -> expert logits [N, E], causal over each sequence via vLLM's KV cache."""

    def __init__(self, config, cache_config: CacheConfig | None, prefix: str) -> None:
        super().__init__()
        self.embed = nn.Embedding(config.vocab_size, config.router_dim)
        self.blocks = nn.ModuleList(
            RouterBlock(config, cache_config, f"{prefix}.blocks.{index}")
            for index in range(config.router_layers))
        self.norm = RMSNorm(config.router_dim, eps=config.rms_norm_eps)
        self.head = ReplicatedLinear(config.router_dim, config.num_experts, bias=False,
                                     prefix=f"{prefix}.head")

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)  # [N, dim]
        for block in self.blocks:
            x = block(positions, x)
        logits, _ = self.head(self.norm(x))
        return logits  # [N, E]
