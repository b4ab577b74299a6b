"""ReadME: a Llama-family decoder whose FFNs are a shared expert plus top-1 routed experts.

Read-ME (Cai et al., NeurIPS 2024) refactors a dense model: each layer's FFN channels are split
into a shared set (used by every token) and equal-size routed experts. ONE routing decision per
token (``expert_ids``) serves every layer, so it can be made before the backbone runs (the
paper's pre-gating router) and the tokens are grouped by expert once per forward pass.
The refactor has no gate weight: a token's FFN output is ``shared(x) + routed_e(x)``, so
routing decisions get no gradient from the LM loss; routers learn from their own logits
(``output_router_logits=True``) against distillation targets.

Who chooses ``expert_ids`` (config.router_type): the caller ("none"); the pre-gating router
("pregating", ``model.router``), before the layers run, from token ids, with its own KV cache;
or a linear gate per layer ("layerwise", ``model.layers.<l>.mlp.gate``) over that layer's FFN
input, the layer-wise baseline with the very same experts. Explicit expert_ids always win.

This file is copied into every saved model folder and loaded with ``trust_remote_code=True``,
so it imports only torch, transformers and its sibling files. Attention, RMSNorm and rotary
embeddings are transformers' own Llama / Mistral / Qwen2 modules, imported.
"""

import torch
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
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

from .configuration_readme import ROUTER_DIMS, ReadMEConfig
from .experts import ExpertGroups, ReadMEExperts, ReadMEMoE, ReadMESharedExpert
from .pregating import PreGatingRouter, RouterCache
from .routing import (
    ReadMECausalLMOutputWithPast,
    ReadMEModelOutputWithPast,
    check_expert_ids,
    choose_experts,
    forget_router_cache,
    reorder_router_cache,
    router_cache_for,
    stack_layer_routing,
)

ATTENTION_CLASSES = {"llama": LlamaAttention, "mistral": MistralAttention, "qwen2": Qwen2Attention}


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
        output_router_logits: bool = False,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (hidden states [B, T, H], the layer-wise gate's logits [B, T, E] or None).

        Without ``expert_groups`` the layer's gate routes its own tokens: the expert is known
        only once the layer's attention has run (what makes layer-wise MoEs hard to serve).
        """
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
        hidden_states = self.post_attention_layernorm(hidden_states)  # [B, T, H]
        gate_logits = None
        if self.mlp.gate is not None and (expert_groups is None or output_router_logits):
            gate_logits = self.mlp.gate(hidden_states)  # [B, T, E]
            if expert_groups is None:
                expert_groups = ExpertGroups.from_expert_ids(gate_logits.argmax(-1),
                                                             gate_logits.shape[-1])
        hidden_states = self.mlp(hidden_states, expert_groups)
        return residual + hidden_states, gate_logits


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
        if isinstance(module, ReadMEMoE) and module.compensation is not None:
            init.zeros_(module.compensation)

    def route(self, input_ids: torch.LongTensor, router_cache: RouterCache | None = None,
              attention_mask: torch.Tensor | None = None
              ) -> tuple[torch.LongTensor, torch.FloatTensor]:
        """Run the pre-gating router alone: (expert_ids [B, T], router_logits [B, T, E]).

        What a serving engine calls ahead of the backbone, then passes ``expert_ids`` to
        forward. ``router_cache`` continues a sequence batch: feed only the new tokens, so a
        decoded token costs one token's projections and one attention row, never a rerun of
        the prefix. ``attention_mask`` [B, cached + T] (1 = token, 0 = padding) hides padding.
        With ``config.router_hysteresis`` > 0 a token keeps its predecessor's expert within that
        logit margin (``routing.choose_experts``).
        """
        router = self.base_model.router
        if router is None:
            where = (" (a layer-wise gate decides inside each layer, once that layer runs)"
                     if self.config.router_type == "layerwise" else "")
            raise ValueError("route() needs the pre-gating router; this model's router_type is "
                             f"{self.config.router_type!r}{where}")
        router_logits = router(input_ids, router_cache, attention_mask)  # [B, T, E]
        chosen = choose_experts(router_logits, self.config.router_hysteresis, router_cache,
                                attention_mask)
        return chosen, router_logits

    def router_parameters(self) -> list[nn.Parameter]:
        """The router's parameters (pre-gating router or layer-wise gates): what router
        training updates with the backbone frozen, and what expert tuning freezes."""
        return [param for module in self.base_model.router_modules()
                for param in module.parameters()]

    def attach_router(self, router_type: str, init_embedding: bool = True, seed: int = 0,
                      **dims) -> None:
        """Give the model a new router of ``router_type`` ("none" removes it) and record it in
        the config, so ``save_pretrained`` writes it and loading rebuilds it.

        ``dims`` are router config fields (ROUTER_DIMS); omitted ones keep the config's values.
        New weights get the model's own init from a ``seed``ed generator (the global RNG is left
        alone): small random layer-wise gates. The pre-gating router's embedding starts, with
        ``init_embedding``, from the backbone's input embedding (``init_embedding_from``).
        """
        unknown = sorted(set(dims) - set(ROUTER_DIMS))
        if unknown:
            raise ValueError(f"unknown router fields {unknown}; expected some of {ROUTER_DIMS}")
        config = self.config
        previous = {name: getattr(config, name) for name in ("router_type", *ROUTER_DIMS)}
        for name, value in {"router_type": router_type, **dims}.items():
            setattr(config, name, value)
        try:
            config.check_router_fields()
        except ValueError:
            for name, value in previous.items():
                setattr(config, name, value)
            raise
        base = self.base_model
        embedding = base.embed_tokens.weight  # [V, H]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            base.build_router()
            for module in base.router_modules():
                module.apply(self._init_weights)
                module.to(device=embedding.device, dtype=embedding.dtype)
        if init_embedding and base.router is not None:
            base.router.init_embedding_from(embedding)


class ReadMEModel(ReadMEPreTrainedModel):
    """The backbone, and the router that chooses its experts (pre-gating: ``router``;
    layer-wise: each layer's ``mlp.gate``). Routers live here rather than in the causal-LM
    head so that the base model alone maps token ids to hidden states, and loading a base
    model from a causal-LM folder (``base_model_prefix``) keeps the router."""

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
        self.build_router()
        self.post_init()

    def build_router(self) -> None:
        """Create the router modules config.router_type names (uninitialised), drop others."""
        config = self.config
        self.router = (PreGatingRouter(
            config.vocab_size, config.num_experts, dim=config.router_dim,
            layers=config.router_layers, heads=config.router_heads,
            mlp_dim=config.router_mlp_dim, rope_theta=config.router_rope_theta,
            eps=config.rms_norm_eps) if config.router_type == "pregating" else None)
        for layer in self.layers:
            layerwise = config.router_type == "layerwise" and layer.mlp.experts is not None
            layer.mlp.gate = (nn.Linear(config.hidden_size, config.num_experts, bias=False)
                              if layerwise else None)

    def router_modules(self) -> list[nn.Module]:
        """The modules that choose experts: [router], the layer-wise gates, or []."""
        if self.router is not None:
            return [self.router]
        return [layer.mlp.gate for layer in self.layers if layer.mlp.gate is not None]

    def resolve_expert_ids(self, expert_ids: torch.Tensor | None, batch_size: int, seq_len: int,
                           device: torch.device) -> torch.Tensor | None:
        """The routed experts of this pass, validated: [batch, seq] or [batch, seq, layers]
        int64, or None when each layer's gate will choose (layer-wise router).

        ``expert_ids`` is [batch, seq] (one expert per token), [batch, seq, layers] (one per
        token and layer, e.g. oracle per-layer routing) or [batch] (one per sequence: domain
        routing, which also serves every KV-cached decode step). Without it and without a
        router there must be nothing to route.
        """
        num_experts = self.config.num_experts
        if expert_ids is not None:
            return check_expert_ids(expert_ids, batch_size, seq_len, self.config.num_hidden_layers,
                                    num_experts, device)
        if self.config.router_type == "layerwise":
            return None
        if self.config.needs_routing:
            raise ValueError(
                f"this ReadME model has {num_experts} routed experts and no router "
                f"(router_type={self.config.router_type!r}): pass expert_ids, ints in "
                f"[0, {num_experts}) of shape [batch, seq] (per token), [batch, seq, layers] "
                "(per token and layer) or [batch] (per sequence)")
        return torch.zeros(batch_size, seq_len, dtype=torch.long, device=device)

    def _pregate(self, input_ids: torch.LongTensor | None,
                 attention_mask: torch.Tensor | dict | None, cache: Cache | None,
                 expert_ids: torch.Tensor | None, output_router_logits: bool
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(router_logits [B, T, E] or None, expert_ids): the pre-gating router runs when it
        must choose the experts or its logits are asked for, with the RouterCache travelling
        with ``cache`` (see routing.py), before the layers add this step to ``cache``."""
        if self.router is None:
            return None, expert_ids
        if expert_ids is not None and not output_router_logits:
            if cache is not None:
                forget_router_cache(cache)
            return None, expert_ids
        if input_ids is None:
            raise ValueError("the pre-gating router reads token ids: pass input_ids (not only "
                             "inputs_embeds), or pass expert_ids")
        padding = (attention_mask if isinstance(attention_mask, torch.Tensor)
                   and attention_mask.dim() == 2 else None)  # [B, past + T]
        router_cache = router_cache_for(cache) if cache is not None else None
        chosen, router_logits = self.route(input_ids, router_cache, padding)
        return router_logits, chosen if expert_ids is None else expert_ids

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
        output_router_logits: bool = False,
        **kwargs: Unpack[TransformersKwargs],
    ) -> ReadMEModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)  # [B, T, H]
        batch_size, seq_len = inputs_embeds.shape[:2]
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        router_logits, expert_ids = self._pregate(input_ids, attention_mask, cache, expert_ids,
                                                  output_router_logits)
        expert_ids = self.resolve_expert_ids(expert_ids, batch_size, seq_len, inputs_embeds.device)
        num_experts = self.config.num_experts
        grouped = self.has_routed_experts and expert_ids is not None
        # [B, T] ids serve every layer: sort the tokens once. [B, T, L]: per layer, below.
        shared_groups = (ExpertGroups.from_expert_ids(expert_ids, num_experts)
                         if grouped and expert_ids.dim() == 2 else None)

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
        gate_logits = []  # per layer [B, T, E] or None
        for layer_idx, decoder_layer in enumerate(self.layers[: self.config.num_hidden_layers]):
            groups = shared_groups
            if grouped and expert_ids.dim() == 3 and decoder_layer.mlp.experts is not None:
                groups = ExpertGroups.from_expert_ids(expert_ids[..., layer_idx], num_experts)
            hidden_states, layer_logits = decoder_layer(
                hidden_states,
                expert_groups=groups,
                output_router_logits=output_router_logits,
                attention_mask=causal_mask_mapping[self.config.layer_types[layer_idx]],
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                **kwargs,
            )
            gate_logits.append(layer_logits)
        hidden_states = self.norm(hidden_states)
        if not output_router_logits:
            return ReadMEModelOutputWithPast(last_hidden_state=hidden_states, cache=cache)
        if self.config.router_type == "layerwise":
            router_logits, expert_ids = stack_layer_routing(gate_logits, expert_ids)
        return ReadMEModelOutputWithPast(last_hidden_state=hidden_states, cache=cache,
                                         router_logits=router_logits, expert_ids=expert_ids)


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
        output_router_logits: bool = False,
        **kwargs: Unpack[TransformersKwargs],
    ) -> ReadMECausalLMOutputWithPast:
        """LlamaForCausalLM.forward plus ``expert_ids`` ([batch, seq], [batch, seq, layers] or
        [batch] routed experts; omitted: the model's router chooses) and
        ``output_router_logits`` (return the router's logits and the expert_ids used)."""
        outputs: ReadMEModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            expert_ids=expert_ids,
            output_router_logits=output_router_logits,
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)  # [B, T_kept, V]
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels,
                                      vocab_size=self.config.vocab_size, **kwargs)
        return ReadMECausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
            expert_ids=outputs.expert_ids,
        )

    def _reorder_cache(self, cache: Cache, beam_idx: torch.LongTensor) -> Cache:
        """Beam search keeps some beams: reorder the router's cache along with the backbone's."""
        cache.reorder_cache(beam_idx)
        reorder_router_cache(cache, beam_idx)
        return cache

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        next_sequence_length: int | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        expert_ids: torch.LongTensor | None = None,
        **kwargs,
    ) -> dict:
        """GenerationMixin's inputs, plus the expert_ids of the positions this step feeds.

        Without expert_ids the model's router chooses (the pre-gating router on the step's new
        tokens only, thanks to its cache). [batch] expert_ids (domain routing) pass through
        unchanged to every step. [batch, seq] and [batch, seq, layers] expert_ids are sliced to
        the step's positions, so they must cover the prompt AND every generated token; a
        prompt-only tensor is refused when the first new token needs an expert.
        """
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, next_sequence_length=next_sequence_length, cache=cache,
            inputs_embeds=inputs_embeds, **kwargs)
        if expert_ids is not None and expert_ids.dim() >= 2:
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
    "ReadMECausalLMOutputWithPast",
    "ReadMEExperts",
    "ReadMEForCausalLM",
    "ReadMEModel",
    "ReadMEModelOutputWithPast",
    "ReadMEPreTrainedModel",
    "ReadMESharedExpert",
]
