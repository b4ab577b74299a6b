"""``ReadMEForCausalLM`` for vLLM: a ReadME folder as written by ``readmoe refactor`` / ``train``.

One model step: the pre-gating router reads the step's token ids (every scheduled token of
every request, prefill chunks and decode tokens alike) and gives each its expert logits, once,
before the backbone runs; then every decoder layer (vLLM's Llama attention, then the layer's
FFN, ``moe.ReadMEFFN``) takes its expert from those logits. A layer-wise folder routes inside
each layer with its own gate instead; a folder without routed choice (one expert) uses expert
0. The backbone is the Llama / Mistral / Qwen2 decoder the folder was cut from (its attention
biases and sliding windows as the HF modules have them).

Parallelism: tensor parallelism splits attention heads (as vLLM's Llama does) and every FFN by
channel (tested on two CPU ranks: the same greedy tokens as HF); the router is replicated.
Expert parallelism (``--enable-expert-parallel``) places whole routed experts on ranks in
vLLM's fused MoE layer, but vLLM 0.32's CPU MoE kernel ignores the expert map
(``fused_moe/experts/cpu_moe.py``), so it is not supported on CPU and untested on GPU.
Pipeline parallelism is not offered (the router's logits would have to travel with the hidden
states between stages), so vLLM refuses it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import (
    ParallelLMHead,
    VocabParallelEmbedding,
)
from vllm.model_executor.models.llama import LlamaAttention
from vllm.model_executor.models.utils import maybe_prefix
from vllm.sequence import IntermediateTensors

from readmoe.integrations.vllm.config import check_servable
from readmoe.integrations.vllm.moe import ReadMEFFN
from readmoe.integrations.vllm.router import PreGatingRouter
from readmoe.integrations.vllm.weights import load_readme_weights


def attention_biases(config) -> tuple[bool, bool]:
    """(q/k/v bias, o_proj bias) of the backbone's attention, as transformers builds it."""
    if config.backbone_type == "qwen2":
        return True, False
    if config.backbone_type == "mistral":
        return False, False
    return config.attention_bias, config.attention_bias


def platform_kernels() -> tuple[list[int] | None, int]:
    """(attention head sizes, fused-MoE hidden alignment) the platform's kernels take; None
    and 1 where vLLM checks them itself."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return None, 1
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    return CPUAttentionBackend.get_supported_head_sizes(), 32


class ReadMEDecoderLayer(nn.Module):
    def __init__(self, vllm_config: VllmConfig, layer: int, prefix: str) -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        qkv_bias, o_bias = attention_biases(config)
        self.self_attn = LlamaAttention(
            config=config, hidden_size=config.hidden_size,
            num_heads=config.num_attention_heads, num_kv_heads=config.num_key_value_heads,
            max_position_embeddings=config.max_position_embeddings,
            quant_config=vllm_config.quant_config, bias=qkv_bias, bias_o_proj=o_bias,
            cache_config=vllm_config.cache_config, prefix=f"{prefix}.self_attn")
        self.mlp = ReadMEFFN(config, layer, vllm_config.quant_config, prefix=f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                residual: torch.Tensor | None, router_logits: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions=positions, hidden_states=hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states, router_logits), residual


# Dimensions named, not inferred: vLLM reads them off forward's annotations, which
# ``from __future__ import annotations`` leaves as strings it does not recognise.
@support_torch_compile(dynamic_arg_dims={"input_ids": 0, "positions": 0,
                                         "intermediate_tensors": 0, "inputs_embeds": 0})
class ReadMEModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        check_servable(config, get_tensor_model_parallel_world_size(), *platform_kernels())
        if vllm_config.parallel_config.enable_expert_parallel and platform_kernels()[0]:
            raise ValueError("--enable-expert-parallel is not supported for ReadME folders on "
                             "vLLM's CPU backend (its MoE kernel ignores the expert map); use "
                             "--tensor-parallel-size alone")
        self.config = config
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size,
                                                   quant_config=vllm_config.quant_config)
        self.router = (PreGatingRouter(config, vllm_config.cache_config, f"{prefix}.router")
                       if config.router_type == "pregating" else None)
        # One expert and no router (a one-expert refactor, a dense model cut as ReadME):
        # expert 0 for every token.
        self.single_expert = config.router_type == "none" and config.num_experts == 1
        self.layers = nn.ModuleList(
            ReadMEDecoderLayer(vllm_config, layer, f"{prefix}.layers.{layer}")
            for layer in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def route(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
              hidden_states: torch.Tensor) -> torch.Tensor | None:
        """The step's router logits [N, E] shared by every layer (None: each layer decides)."""
        if self.router is not None:
            if input_ids is None:
                raise ValueError("the pre-gating router reads token ids; prompt embeddings "
                                 "(--enable-prompt-embeds) cannot be routed: send token ids")
            return self.router(input_ids, positions)
        if self.single_expert:
            return hidden_states.new_zeros(hidden_states.shape[0], 1)
        return None

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        hidden_states = (inputs_embeds if inputs_embeds is not None
                         else self.embed_input_ids(input_ids))  # [N, H]
        router_logits = self.route(input_ids, positions, hidden_states)
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual, router_logits)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class ReadMEForCausalLM(nn.Module):
    """The vLLM model registered for the ``ReadMEForCausalLM`` architecture."""

    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"],
                              "gate_up_proj": ["gate_proj", "up_proj"]}

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.model = ReadMEModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size,
                                      quant_config=vllm_config.quant_config,
                                      prefix=maybe_prefix(prefix, "lm_head"))
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return load_readme_weights(self, weights)
