"""Configuration of a ReadME model: a Llama-family backbone whose FFNs are refactored into experts.

This file is copied into every saved model folder and loaded with ``trust_remote_code=True``,
so it imports only ``transformers`` and its sibling files (never ``readmoe``).

Per layer ``l`` the FFN holds a shared expert of ``shared_intermediate_sizes[l]`` channels (run
for every token) and ``num_experts`` routed experts of ``expert_intermediate_sizes[l]`` channels
each (one per token, top-1). Either size may be 0. Attention, norms and embeddings are the dense
model's, reused from transformers' own Llama / Mistral / Qwen2 modules (``backbone_type``).
"""

import copy

from transformers.configuration_utils import PreTrainedConfig

from .pregating import default_router_dim

BACKBONE_TYPES = ("llama", "mistral", "qwen2")
# What computes expert_ids when the caller does not pass them. "none": the caller always does (an
# oracle, a domain label, or a router run beforehand, as in serving). "pregating": the paper's
# router, one tiny causal transformer over token ids whose choice serves every layer.
# "layerwise": the baseline, a linear gate per layer over that layer's FFN input.
ROUTER_TYPES = ("none", "pregating", "layerwise")
# The pre-gating router's shape fields (``ReadMEForCausalLM.attach_router`` takes them).
ROUTER_DIMS = ("router_dim", "router_layers", "router_heads", "router_mlp_dim", "router_rope_theta")


class ReadMEConfig(PreTrainedConfig):
    r"""Backbone fields follow `LlamaConfig`; the MoE fields are:

    num_experts: routed experts per layer (the paper: one per calibration domain).
    expert_names: a name per routed expert (the domain it was cut for).
    shared_intermediate_sizes: shared-expert channels per layer.
    expert_intermediate_sizes: channels of each routed expert, per layer (equal within a layer).
    compensation: whether every FFN adds a compensation bias for the channels it dropped
        (``mlp.compensation``: ``[E, H]``, one per routed expert, or ``[1, H]`` in a layer
        without a routed part), measured at refactoring as FLAP does.
    dense_intermediate_size: FFN width of the dense model the experts were cut from.
    backbone_type: which transformers attention class to reuse: "llama" (bias set by
        ``attention_bias``), "mistral" (no bias, sliding window) or "qwen2" (q/k/v bias, no o bias).
    router_type: what computes expert_ids when the caller does not pass them (ROUTER_TYPES).

    The pre-gating router's shape (used when router_type is "pregating"; paper Table 1 for
    Llama-2-7B: 512 wide, 1 layer, 4 heads, MLP 512):

    router_dim: embedding / feature width; default ``default_router_dim(hidden_size)``
        (hidden/4 in multiples of 32, within [64, 512]).
    router_layers: transformer blocks (default 1).
    router_heads: attention heads (default 4); router_dim / router_heads must be even.
    router_mlp_dim: SwiGLU width (default router_dim, as in the paper).
    router_rope_theta: RoPE base (default 10000).
    router_hysteresis: a token keeps the previous token's routed expert unless the router's best
        logit beats that expert's by more than this margin (default 0: plain argmax). Why: a
        request that keeps its expert keeps the expert cache warm; the router's top logits are
        often close, and trained towards the per-token oracle it switches on small margins.
    """

    model_type = "readme"

    vocab_size: int = 32000
    hidden_size: int = 4096
    dense_intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    sliding_window: int | None = None
    layer_types: list[str] | None = None
    backbone_type: str = "llama"
    num_experts: int = 1
    expert_names: list[str] | None = None
    shared_intermediate_sizes: list[int] | None = None
    expert_intermediate_sizes: list[int] | None = None
    compensation: bool = False
    router_type: str = "none"
    router_dim: int | None = None
    router_layers: int = 1
    router_heads: int = 4
    router_mlp_dim: int | None = None
    router_rope_theta: float = 10000.0
    router_hysteresis: float = 0.0

    def __post_init__(self, **kwargs):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.layer_types is None:
            kind = "full_attention" if self.sliding_window is None else "sliding_attention"
            self.layer_types = [kind] * self.num_hidden_layers
        # Defaults describe the dense model itself: everything shared, no routed channels.
        if self.shared_intermediate_sizes is None:
            self.shared_intermediate_sizes = [self.dense_intermediate_size] * self.num_hidden_layers
        if self.expert_intermediate_sizes is None:
            self.expert_intermediate_sizes = [0] * self.num_hidden_layers
        if self.expert_names is None:
            self.expert_names = [f"expert_{index}" for index in range(self.num_experts)]
        if self.router_dim is None:
            self.router_dim = default_router_dim(self.hidden_size)
        if self.router_mlp_dim is None:
            self.router_mlp_dim = self.router_dim
        self._check_moe_fields()
        self.check_router_fields()
        super().__post_init__(**kwargs)

    def _check_moe_fields(self) -> None:
        """Fail at construction, with the field named, rather than deep inside a forward pass."""
        if self.backbone_type not in BACKBONE_TYPES:
            raise ValueError(f"backbone_type must be one of {BACKBONE_TYPES}, "
                             f"got {self.backbone_type!r}")
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be at least 1, got {self.num_experts}")
        if len(self.expert_names) != self.num_experts:
            raise ValueError(f"expert_names has {len(self.expert_names)} names for "
                             f"{self.num_experts} experts")
        for name in ("shared_intermediate_sizes", "expert_intermediate_sizes", "layer_types"):
            if len(getattr(self, name)) != self.num_hidden_layers:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries, expected one per "
                                 f"layer ({self.num_hidden_layers})")
        for layer, (shared, expert) in enumerate(
                zip(self.shared_intermediate_sizes, self.expert_intermediate_sizes, strict=True)):
            if shared < 0 or expert < 0 or shared + expert == 0:
                raise ValueError(f"layer {layer}: shared size {shared} and expert size {expert} "
                                 "must be >= 0 and not both 0")

    def check_router_fields(self) -> None:
        """Validate router_type and the router's shape (also after ``attach_router`` edits them)."""
        if self.router_type not in ROUTER_TYPES:
            raise ValueError(f"router_type must be one of {ROUTER_TYPES}, got {self.router_type!r}")
        for name in ("router_dim", "router_layers", "router_heads", "router_mlp_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.router_hysteresis >= 0:
            raise ValueError(f"router_hysteresis must be >= 0 (a logit margin), got "
                             f"{self.router_hysteresis}")
        if self.router_dim % self.router_heads or (self.router_dim // self.router_heads) % 2:
            raise ValueError(f"router_dim {self.router_dim} must split into router_heads "
                             f"{self.router_heads} heads of even width (RoPE rotates pairs)")

    @property
    def needs_routing(self) -> bool:
        """True when some layer has a routed part and there is more than one expert to choose."""
        return self.num_experts > 1 and any(size > 0 for size in self.expert_intermediate_sizes)

    @classmethod
    def from_dense_config(
        cls,
        dense_config: PreTrainedConfig,
        shared_intermediate_sizes: list[int],
        expert_intermediate_sizes: list[int],
        expert_names: list[str],
        **overrides,
    ) -> "ReadMEConfig":
        """The ReadME config of a Llama / Mistral / Qwen2 dense config cut into the given sizes."""
        backbone = dense_config.model_type
        if backbone not in BACKBONE_TYPES:
            raise ValueError(f"dense model type {backbone!r} is not supported; "
                             f"expected one of {BACKBONE_TYPES}")
        head_dim = (getattr(dense_config, "head_dim", None)
                    or dense_config.hidden_size // dense_config.num_attention_heads)
        sliding_window = getattr(dense_config, "sliding_window", None)
        layer_types = getattr(dense_config, "layer_types", None)
        if backbone == "mistral" and sliding_window is not None:
            # MistralAttention applies config.sliding_window on every layer.
            layer_types = ["sliding_attention"] * dense_config.num_hidden_layers
        fields = {
            "vocab_size": dense_config.vocab_size,
            "hidden_size": dense_config.hidden_size,
            "dense_intermediate_size": dense_config.intermediate_size,
            "num_hidden_layers": dense_config.num_hidden_layers,
            "num_attention_heads": dense_config.num_attention_heads,
            "num_key_value_heads": dense_config.num_key_value_heads,
            "head_dim": head_dim,
            "hidden_act": dense_config.hidden_act,
            "max_position_embeddings": dense_config.max_position_embeddings,
            "initializer_range": dense_config.initializer_range,
            "rms_norm_eps": dense_config.rms_norm_eps,
            "pad_token_id": dense_config.pad_token_id,
            "bos_token_id": dense_config.bos_token_id,
            "eos_token_id": dense_config.eos_token_id,
            "tie_word_embeddings": dense_config.tie_word_embeddings,
            "rope_parameters": copy.deepcopy(dense_config.rope_parameters),
            "attention_bias": getattr(dense_config, "attention_bias", False),
            "attention_dropout": dense_config.attention_dropout,
            "sliding_window": sliding_window,
            "layer_types": list(layer_types) if layer_types is not None else None,
            "backbone_type": backbone,
            "num_experts": len(expert_names),
            "expert_names": list(expert_names),
            "shared_intermediate_sizes": [int(size) for size in shared_intermediate_sizes],
            "expert_intermediate_sizes": [int(size) for size in expert_intermediate_sizes],
        }
        fields.update(overrides)
        return cls(**fields)


ReadMEConfig.register_for_auto_class()

__all__ = ["BACKBONE_TYPES", "ROUTER_DIMS", "ROUTER_TYPES", "ReadMEConfig"]
