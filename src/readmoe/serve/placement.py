"""Put a ReadME model where an offloaded server wants it: everything but the routed experts.

Why: an ``ExpertStore`` keeps routed experts in a slow tier and ``capacity`` of them per layer
in the fast one, but the model object still holds every expert unless told otherwise; the
memory an offloaded server saves is only real once those tensors are gone. After
``place_for_offload`` the attention, norms, shared experts, embeddings, head and router sit on
``device`` and each layer's stacked routed experts are empty, so the model serves only through
an engine with an expert store (the store reads the experts from the model folder). Load the
model on CPU first (``load_model``), then place it: the experts never reach the accelerator.
"""

from __future__ import annotations

import torch
from torch import nn

from readmoe.errors import ReadmoeError

EXPERT_PARTS = ("gate_proj", "up_proj", "down_proj")


def routed_expert_bytes(model: nn.Module) -> int:
    """Bytes of the model's stacked routed experts (0 once placed for offload)."""
    total = 0
    for layer in model.model.layers:
        experts = layer.mlp.experts
        if experts is not None:
            total += sum(getattr(experts, part).numel() * getattr(experts, part).element_size()
                         for part in EXPERT_PARTS)
    return total


def place_for_offload(model: nn.Module, device: str | torch.device = "cpu") -> int:
    """Empty the routed experts and move the rest of ``model`` to ``device``; return the bytes
    of expert weights released. The model then needs an ``ExpertStore`` to run."""
    if not hasattr(model, "model") or not hasattr(model.model, "layers"):
        raise ReadmoeError("place_for_offload expects a ReadME model (ReadMEForCausalLM)")
    released = routed_expert_bytes(model)
    for layer in model.model.layers:
        experts = layer.mlp.experts
        if experts is None:
            continue
        for part in EXPERT_PARTS:
            weight = getattr(experts, part)
            setattr(experts, part, nn.Parameter(weight.new_empty(weight.shape[0], 0, 0),
                                                requires_grad=False))
    model.to(device)
    return released


def experts_offloaded(model: nn.Module) -> bool:
    """Whether ``place_for_offload`` emptied the model's routed experts."""
    return any(layer.mlp.experts is not None and layer.mlp.experts.gate_proj.numel() == 0
               for layer in model.model.layers)
