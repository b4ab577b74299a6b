"""Routing a prompt as the engine does, and every token a step sampled in one pre-gating
router call.

Why: each decoded token's expert must be known right after sampling, before the step that
feeds it back. Routing the step's S new tokens one request at a time costs S small router
passes; here the router's projections, MLP and head run once over all S tokens, and only
attention is per request, one query against that request's own ``RouterCache`` (updated in
place, as ``model.route`` would). Equal to ``model.route([[token]], cache)`` per request
(tested), so the engine's outputs still equal HF ``generate``'s.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from readmoe.model.pregating import PreGatingRouter, RouterCache, rotary, sticky_argmax


@torch.inference_mode()
def prompt_experts(model, prompt_ids: Sequence[int],
                   cache: RouterCache | None = None) -> list[int] | None:
    """Each prompt token's routed expert, read ahead of the backbone; None where each layer's
    gate decides inside it (a layer-wise model), all 0 for a model without a router (one
    expert or none). ``cache`` (pre-gating only) is left holding the prompt."""
    if model.config.router_type == "layerwise":
        return None
    if model.model.router is None:
        return [0] * len(prompt_ids)
    ids = torch.tensor([list(prompt_ids)], device=model.device)  # [1, T]
    return model.route(ids, cache)[0][0].tolist()


@torch.inference_mode()
def route_next(router: PreGatingRouter, tokens: Sequence[int],
               caches: Sequence[RouterCache], margin: float = 0.0) -> list[int]:
    """The expert of each ``tokens[i]``, the next token of the sequence in ``caches[i]``, with
    the model's hysteresis ``margin`` (``config.router_hysteresis``: keep the sequence's
    previous expert within that logit margin); each choice is recorded in its cache."""
    if not tokens:
        return []
    device = router.embed.weight.device
    x = router.embed(torch.tensor(tokens, device=device))[:, None]  # [S, 1, dim]
    positions = torch.tensor([cache.length for cache in caches], device=device)  # [S]
    for layer, block in enumerate(router.blocks):
        count, _, dim = x.shape
        q, k, v = block.qkv(block.attn_norm(x)).split(dim, dim=-1)  # [S, 1, dim] each
        # the S tokens as one sequence of S positions, so one RoPE call rotates them all
        q, k = (rotary(t.view(1, count, block.heads, block.head_dim).transpose(1, 2),
                       positions, block.theta) for t in (q, k))  # [1, heads, S, d]
        v = v.view(1, count, block.heads, block.head_dim).transpose(1, 2)
        attended = []
        for i, cache in enumerate(caches):
            keys, values = cache.update(layer, k[:, :, i:i + 1], v[:, :, i:i + 1])
            allowed = torch.ones(1, keys.shape[2], dtype=torch.bool, device=device)
            attended.append(F.scaled_dot_product_attention(
                q[:, :, i:i + 1], keys, values, attn_mask=allowed,
                scale=1.0 / math.sqrt(block.head_dim)))  # [1, heads, 1, d]
        attn = torch.cat(attended).transpose(1, 2).reshape(count, 1, dim)
        x = x + block.out(attn)
        h = block.mlp_norm(x)
        x = x + block.down(F.silu(block.gate(h)) * block.up(h))
    logits = router.head(router.norm(x))  # [S, 1, E]
    previous = [cache.previous_experts() for cache in caches]
    known = torch.tensor([-1 if p is None else int(p[0]) for p in previous], device=device)
    chosen = sticky_argmax(logits, margin, known)  # [S, 1]
    for i, cache in enumerate(caches):
        cache.record(chosen[i:i + 1])
    return chosen[:, 0].tolist()
