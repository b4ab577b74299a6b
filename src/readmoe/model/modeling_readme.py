"""ReadME: a Llama-family decoder whose FFNs are a shared expert plus top-1 routed experts.

Read-ME (Cai et al., NeurIPS 2024) refactors a dense model: each layer's FFN channels are split
into a shared set (used by every token) and equal-size routed experts. ONE routing decision per
token (``expert_ids``) serves every layer, so it can be made before the backbone runs (the
paper's pre-gating router) and the tokens are grouped by expert once per forward pass.
The refactor has no gate weight: a token's FFN output is ``shared(x) + routed_e(x)``.

This file is copied into every saved model folder and loaded with ``trust_remote_code=True``,
so it imports only torch, transformers and its sibling configuration file. Attention, RMSNorm
and rotary embeddings are transformers' own Llama / Mistral / Qwen2 modules, imported.
"""

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel, slice_logits_to_keep
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)
from transformers.models.mistral.modeling_mistral import MistralAttention
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_readme import ReadMEConfig

ATTENTION_CLASSES = {"llama": LlamaAttention, "mistral": MistralAttention, "qwen2": Qwen2Attention}
INTEGER_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


@dataclass
class ExpertGroups:
    """The tokens of one forward pass grouped by routed expert.

    Every layer routes a token to the same expert, so the sort is done once per forward pass
    rather than once per layer.
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

    def forward(self, x: torch.Tensor, groups: ExpertGroups) -> torch.Tensor:
        """x: [N, H] -> [N, H], each token through its own expert (weight 1, no gate)."""
        grouped = x.index_select(0, groups.order)  # [N, H], tokens of expert 0 first
        outputs = []
        start = 0
        for expert, count in enumerate(groups.counts):
            if count == 0:
                continue
            tokens = grouped[start:start + count]  # [n, H]
            hidden = (self.act_fn(F.linear(tokens, self.gate_proj[expert]))
                      * F.linear(tokens, self.up_proj[expert]))  # [n, R]
            outputs.append(F.linear(hidden, self.down_proj[expert]))  # [n, H]
            start += count
        # Every token has exactly one expert, so copying back fills every row.
        return torch.empty_like(x).index_copy(0, groups.order, torch.cat(outputs))


class ReadMEMoE(nn.Module):
    """One layer's FFN: shared expert (none if S_l = 0) + routed experts (none if R_l = 0)."""

    def __init__(self, config: ReadMEConfig, layer_idx: int):
        super().__init__()
        shared_size = config.shared_intermediate_sizes[layer_idx]
        expert_size = config.expert_intermediate_sizes[layer_idx]
        self.shared = (ReadMESharedExpert(config.hidden_size, shared_size, config.hidden_act)
                       if shared_size > 0 else None)
        self.experts = (ReadMEExperts(config.num_experts, config.hidden_size, expert_size,
                                      config.hidden_act)
                        if expert_size > 0 else None)

    def forward(self, hidden_states: torch.Tensor, groups: ExpertGroups | None) -> torch.Tensor:
        shape = hidden_states.shape  # [B, T, H]
        flat = hidden_states.reshape(-1, shape[-1])  # [N, H]
        output = self.shared(flat) if self.shared is not None else None
        if self.experts is not None:
            routed = self.experts(flat, groups)
            output = routed if output is None else output + routed
        return output.view(shape)


class ReadMEDecoderLayer(GradientCheckpointingLayer):
    """LlamaDecoderLayer with the MLP replaced by ReadMEMoE; attention from the backbone."""

    def __init__(self, config: ReadMEConfig, layer_idx: int):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.self_attn = ATTENTION_CLASSES[config.backbone_type](config=config, layer_idx=layer_idx)
        self.mlp = ReadMEMoE(config, layer_idx)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        expert_groups: ExpertGroups | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states, expert_groups)
        return residual + hidden_states


class ReadMEPreTrainedModel(PreTrainedModel):
    config: ReadMEConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["ReadMEDecoderLayer"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_record_outputs = {
        "hidden_states": ReadMEDecoderLayer,
        "attentions": list(ATTENTION_CLASSES.values()),
    }

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, ReadMEExperts):
            std = self.config.initializer_range
            init.normal_(module.gate_proj, mean=0.0, std=std)
            init.normal_(module.up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)


class ReadMEModel(ReadMEPreTrainedModel):
    def __init__(self, config: ReadMEConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [ReadMEDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.has_sliding_layers = "sliding_attention" in config.layer_types
        self.has_routed_experts = any(size > 0 for size in config.expert_intermediate_sizes)
        self.post_init()

    def resolve_expert_ids(self, expert_ids: torch.Tensor | None, batch_size: int, seq_len: int,
                           device: torch.device) -> torch.Tensor:
        """The routed expert of every token of this pass, [batch, seq] int64, validated.

        ``expert_ids`` is [batch, seq] (one expert per token) or [batch] (one expert per
        sequence: domain routing, which also serves every KV-cached decode step). Without it
        there must be nothing to route. A built-in router (config.router_type) goes here.
        """
        num_experts = self.config.num_experts
        if expert_ids is None:
            if self.config.needs_routing:
                raise ValueError(
                    f"this ReadME model has {num_experts} routed experts and no router "
                    f"(router_type={self.config.router_type!r}): pass expert_ids, ints in "
                    f"[0, {num_experts}) of shape [batch, seq] (per token) or [batch] "
                    "(per sequence)")
            return torch.zeros(batch_size, seq_len, dtype=torch.long, device=device)
        expert_ids = torch.as_tensor(expert_ids, device=device)
        if expert_ids.dtype not in INTEGER_DTYPES:
            raise ValueError(f"expert_ids must be an integer tensor, got dtype {expert_ids.dtype}")
        if expert_ids.dim() == 1 and expert_ids.shape[0] == batch_size:
            expert_ids = expert_ids[:, None].expand(batch_size, seq_len)  # [B] -> [B, T]
        elif expert_ids.dim() != 2 or tuple(expert_ids.shape) != (batch_size, seq_len):
            raise ValueError(
                f"expert_ids has shape {tuple(expert_ids.shape)}; expected [batch, seq] = "
                f"[{batch_size}, {seq_len}] (one expert per input token) or [batch] = "
                f"[{batch_size}] (one expert per sequence)")
        if expert_ids.numel():
            low, high = (int(value) for value in torch.aminmax(expert_ids))
            if low < 0 or high >= num_experts:
                raise ValueError(f"expert_ids must lie in [0, {num_experts}) (the model has "
                                 f"{num_experts} experts), got values from {low} to {high}")
        return expert_ids.long()

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        expert_ids: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)  # [B, T, H]
        batch_size, seq_len = inputs_embeds.shape[:2]
        expert_ids = self.resolve_expert_ids(expert_ids, batch_size, seq_len, inputs_embeds.device)
        expert_groups = (ExpertGroups.from_expert_ids(expert_ids, self.config.num_experts)
                         if self.has_routed_experts else None)

        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(seq_len, device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)  # [1, T]

        # It may already have been prepared by generate() (one mask per attention type).
        if not isinstance(causal_mask_mapping := attention_mask, dict):
            mask_kwargs = {
                "config": self.config,
                "inputs_embeds": inputs_embeds,
                "attention_mask": attention_mask,
                "cache": cache,
                "position_ids": position_ids,
            }
            causal_mask_mapping = {"full_attention": create_causal_mask(**mask_kwargs)}
            if self.has_sliding_layers:
                causal_mask_mapping["sliding_attention"] = create_sliding_window_causal_mask(
                    **mask_kwargs)

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        for layer_idx, decoder_layer in enumerate(self.layers[: self.config.num_hidden_layers]):
            hidden_states = decoder_layer(
                hidden_states,
                expert_groups=expert_groups,
                attention_mask=causal_mask_mapping[self.config.layer_types[layer_idx]],
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                **kwargs,
            )
        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, cache=cache)


class ReadMEForCausalLM(ReadMEPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: ReadMEConfig):
        super().__init__(config)
        self.model = ReadMEModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        expert_ids: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CausalLMOutputWithPast:
        """LlamaForCausalLM.forward plus ``expert_ids``: [batch, seq] or [batch] routed experts."""
        outputs: BaseModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            expert_ids=expert_ids,
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)  # [B, T_kept, V]
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels,
                                      vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        next_sequence_length: int | None = None,
        cache: Cache | None = None,
        expert_ids: torch.LongTensor | None = None,
        **kwargs,
    ) -> dict:
        """GenerationMixin's inputs, plus the expert_ids of the positions this step feeds.

        [batch] expert_ids (domain routing) pass through unchanged to every step. [batch, seq]
        expert_ids are sliced to the step's positions, so they must cover the prompt AND every
        generated token; a prompt-only tensor is refused when the first new token needs an expert.
        """
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, next_sequence_length=next_sequence_length, cache=cache, **kwargs)
        if expert_ids is not None and expert_ids.dim() == 2:
            step_input = model_inputs.get("input_ids")
            if step_input is None:
                step_input = model_inputs["inputs_embeds"]
            start = cache.get_seq_length() if cache is not None else 0
            end = start + step_input.shape[1]
            if expert_ids.shape[1] < end:
                raise ValueError(
                    f"expert_ids of shape {tuple(expert_ids.shape)} name an expert for "
                    f"{expert_ids.shape[1]} positions, but generate() needs one for position "
                    f"{end - 1}: per-token expert_ids must cover the prompt and every new token. "
                    "For domain routing pass one expert per sequence, shape [batch].")
            expert_ids = expert_ids[:, start:end]
        model_inputs["expert_ids"] = expert_ids
        return model_inputs


ReadMEForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "ExpertGroups",
    "ReadMEExperts",
    "ReadMEForCausalLM",
    "ReadMEModel",
    "ReadMEPreTrainedModel",
    "ReadMESharedExpert",
]
