"""Routing plumbing of the ReadME model: expert_ids checks, the router's cache, outputs.

This file is copied into every saved model folder next to modeling_readme.py
(``trust_remote_code``), so it imports only torch, transformers and its sibling files.

The pre-gating router's KV cache travels WITH the backbone's cache: it is an attribute of the
transformers ``Cache`` object of the sequence batch. A new Cache (every ``generate()`` call makes
one) therefore starts a new router cache; a deep copy of a Cache (prompt reuse) copies it; a
Cache rolled back or reset (``crop``, assisted decoding, ``reset``) is matched by cropping the
router cache to the backbone cache's length (the router is causal, so a prefix of its keys and
values stays exact); beam search reorders both (``ReadMEForCausalLM._reorder_cache``). The
router thus only ever runs on the tokens the backbone step feeds: one per decode step.
"""

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .pregating import RouterCache, sticky_argmax

INTEGER_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
ROUTER_CACHE_ATTRIBUTE = "readme_router_cache"


def check_expert_ids(expert_ids: torch.Tensor, batch_size: int, seq_len: int, num_layers: int,
                     num_experts: int, device: torch.device) -> torch.Tensor:
    """Validated int64 expert ids: [B, T] (one expert per token for all layers), or [B, T, L]
    (one per token and layer). [B] (one per sequence: domain routing) is expanded to [B, T]."""
    expert_ids = torch.as_tensor(expert_ids, device=device)
    if expert_ids.dtype not in INTEGER_DTYPES:
        raise ValueError(f"expert_ids must be an integer tensor, got dtype {expert_ids.dtype}")
    shape = tuple(expert_ids.shape)
    if expert_ids.dim() == 1 and shape[0] == batch_size:
        expert_ids = expert_ids[:, None].expand(batch_size, seq_len)  # [B] -> [B, T]
    elif shape not in ((batch_size, seq_len), (batch_size, seq_len, num_layers)):
        raise ValueError(
            f"expert_ids has shape {shape}; expected [batch, seq] = [{batch_size}, {seq_len}] "
            f"(one expert per input token), [batch, seq, layers] = [{batch_size}, {seq_len}, "
            f"{num_layers}] (one per token and layer) or [batch] = [{batch_size}] (one expert "
            "per sequence)")
    if expert_ids.numel():
        low, high = (int(value) for value in torch.aminmax(expert_ids))
        if low < 0 or high >= num_experts:
            raise ValueError(f"expert_ids must lie in [0, {num_experts}) (the model has "
                             f"{num_experts} experts), got values from {low} to {high}")
    return expert_ids.long()


def router_cache_for(cache: Cache) -> RouterCache:
    """The RouterCache travelling with `cache`, made to hold exactly the tokens `cache` holds.

    Call it before the backbone layers add this step's tokens to `cache`.
    """
    past = cache.get_seq_length()
    router_cache = getattr(cache, ROUTER_CACHE_ATTRIBUTE, None)
    if router_cache is None and past == 0:
        router_cache = RouterCache()
        setattr(cache, ROUTER_CACHE_ATTRIBUTE, router_cache)
    elif router_cache is not None and router_cache.length > past:
        router_cache.crop(past)
    if router_cache is None or router_cache.length < past:
        raise ValueError(
            f"the cache holds {past} tokens that the pre-gating router has not seen (they were "
            "run with explicit expert_ids): keep passing expert_ids for this sequence, or start "
            "a new cache so the router sees every token")
    return router_cache


def forget_router_cache(cache: Cache) -> None:
    """Drop the router cache of `cache`: the backbone ran tokens the router did not see."""
    if hasattr(cache, ROUTER_CACHE_ATTRIBUTE):
        delattr(cache, ROUTER_CACHE_ATTRIBUTE)


def reorder_router_cache(cache: Cache, beam_idx: torch.Tensor) -> None:
    """Keep the router cache's rows in step with ``cache.reorder_cache(beam_idx)``."""
    router_cache = getattr(cache, ROUTER_CACHE_ATTRIBUTE, None)
    if router_cache is not None:
        router_cache.reorder(beam_idx)


def choose_experts(router_logits: torch.Tensor, margin: float, router_cache: RouterCache | None,
                   attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The pre-gating router's experts [B, T] for its logits [B, T, E] (``sticky_argmax`` with
    the config's hysteresis ``margin``), continuing from the choice ``router_cache`` remembers
    for the token before (none where that token is padding in ``attention_mask`` [B, cached +
    T]) and recorded there for the next call."""
    steps = router_logits.shape[1]
    valid = attention_mask[:, -steps:].bool() if attention_mask is not None else None
    previous = router_cache.previous_experts() if router_cache is not None else None
    if previous is not None and attention_mask is not None:
        previous = previous.masked_fill(~attention_mask[:, -steps - 1].bool(), -1)
    chosen = sticky_argmax(router_logits, margin, previous, valid)
    if router_cache is not None:
        router_cache.record(chosen)
    return chosen


def stack_layer_routing(layer_logits: list[torch.Tensor | None],
                        expert_ids: torch.Tensor | None
                        ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Layer-wise gates' logits (each [B, T, E], None for a layer without routed channels)
    -> (router_logits [B, T, L, E], expert_ids): the given expert_ids, else the gates' choices
    [B, T, L]. A layer without routed channels has no gate: zero logits and expert 0 (every
    expert gives that layer the same output)."""
    present = [logits for logits in layer_logits if logits is not None]
    if not present:
        return None, expert_ids
    zeros = torch.zeros_like(present[0])
    router_logits = torch.stack([zeros if logits is None else logits for logits in layer_logits],
                                dim=2)  # [B, T, L, E]
    return router_logits, router_logits.argmax(-1) if expert_ids is None else expert_ids


@dataclass
class ReadMEModelOutputWithPast(BaseModelOutputWithPast):
    """BaseModelOutputWithPast plus, with ``output_router_logits=True``, the routing.

    router_logits: pre-gating [B, T, E]; layer-wise [B, T, L, E]; None without a router.
    expert_ids: the routed expert of each token that the backbone used, [B, T] or [B, T, L].
    """

    router_logits: torch.FloatTensor | None = None
    expert_ids: torch.LongTensor | None = None


@dataclass
class ReadMECausalLMOutputWithPast(CausalLMOutputWithPast):
    """CausalLMOutputWithPast plus ``router_logits`` and ``expert_ids`` as in
    ReadMEModelOutputWithPast (set with ``output_router_logits=True``)."""

    router_logits: torch.FloatTensor | None = None
    expert_ids: torch.LongTensor | None = None
