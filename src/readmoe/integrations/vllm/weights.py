"""A ReadME folder's safetensors names -> the vLLM model's parameters.

Most tensors keep their name (the vLLM modules are named after the checkpoint). The rest:
q/k/v projections go into vLLM's fused ``qkv_proj``; the shared expert's gate and up into its
fused ``gate_up_proj``; the stacked routed experts (``experts.gate_proj`` / ``up_proj``
``[E, R, H]``, ``experts.down_proj`` ``[E, H, R]``) expert by expert into the fused MoE layer's
``w13_weight`` / ``w2_weight`` (its loader keeps only the experts local to this rank under
expert parallelism). Every FFN tensor is zero-padded to the layer's padded size first
(``config.padded``), which is what lets tensor parallelism split sizes such as 409. Each
parameter's own ``weight_loader`` takes its tensor-parallel slice.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.model_loader.weight_utils import default_weight_loader

from readmoe.integrations.vllm.config import padded

QKV_SHARDS = {"q_proj": "q", "k_proj": "k", "v_proj": "v"}
GATE_UP_SHARDS = {"gate_proj": 0, "up_proj": 1}
# checkpoint name -> (fused MoE parameter, shard id, dimension of the expert's channels)
EXPERT_SHARDS = {"gate_proj": ("w13_weight", "w1", 0), "up_proj": ("w13_weight", "w3", 0),
                 "down_proj": ("w2_weight", "w2", 1)}


def pad_to(tensor: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """``tensor`` with zeros appended along ``dim`` up to ``size``."""
    missing = size - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor, tensor.new_zeros(shape)], dim=dim)


def load_readme_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]]
                        ) -> set[str]:
    """Load ``weights`` into ``model`` (a ``ReadMEForCausalLM``); return the parameter names
    filled, which vLLM checks against all of the model's parameters."""
    config = model.config
    tp_size = get_tensor_model_parallel_world_size()
    params = dict(model.named_parameters())
    loaded: set[str] = set()

    def param(name: str, source: str) -> nn.Parameter:
        if name not in params:
            raise ValueError(f"checkpoint tensor {source!r} has no place in the vLLM ReadME "
                             "model: is config.json the one this folder's weights were saved "
                             "with?")
        loaded.add(name)
        return params[name]

    for name, tensor in weights:
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # the embedding is the head
        parts = name.split(".")
        if ".self_attn." in name and parts[-2] in QKV_SHARDS:
            target = param(name.replace(f".{parts[-2]}.", ".qkv_proj."), name)
            target.weight_loader(target, tensor, QKV_SHARDS[parts[-2]])
        elif ".mlp.shared." in name:
            size = padded(config.shared_intermediate_sizes[int(parts[2])], tp_size)
            if parts[-2] in GATE_UP_SHARDS:
                target = param(name.replace(f".{parts[-2]}.", ".gate_up_proj."), name)
                target.weight_loader(target, pad_to(tensor, 0, size), GATE_UP_SHARDS[parts[-2]])
            else:
                target = param(name, name)
                target.weight_loader(target, pad_to(tensor, 1, size))
        elif ".mlp.experts." in name:
            size = padded(config.expert_intermediate_sizes[int(parts[2])], tp_size)
            fused, shard, dim = EXPERT_SHARDS[parts[-1]]
            target = param(f"{name.rsplit('.', 1)[0]}.routed_experts.{fused}", name)
            for expert, weight in enumerate(tensor):
                target.weight_loader(target, pad_to(weight, dim, size), fused, shard_id=shard,
                                     expert_id=expert)
        else:
            target = param(name, name)
            getattr(target, "weight_loader", default_weight_loader)(target, tensor)
    return loaded
