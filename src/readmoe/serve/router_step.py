"""Routing a prompt as the engine does, and every token a step sampled in one pre-gating
router call over a paged router cache.

Why: each decoded token's expert must be known right after sampling, before the step that
feeds it back. A per-request ``RouterCache`` costs, per request and router layer, two
concatenations (its cache grows by copy) and one attention call: 3.1 ms a batch-32 decode step
on the default model in the engine (2 CPU threads), 3-4% of the step. Here the router's keys
and values live in pools beside the backbone's paged KV cache, at the backbone's own slots (the
router sees the same tokens at the same positions), so one step writes each new key once and
attends for every request in one call. Where the fused CPU ops are built, the step is one call
(``Router``, ``csrc/router.cpp``): each router block two of the runner's layer calls
(``decode_attention_block``, then ``moe_ffn`` with the MLP as the shared expert), the slots,
embedding, head and hysteresis in C++ around them. In the engine, 2 threads, that took the
step from 1.2 to 0.55 ms at batch 1 (the same calls from Python take 0.3 ms warm, but in the
engine they follow a step that streamed every weight through the caches). Elsewhere (GPU,
other dtypes) the same math runs in torch ops. Equal to
``model.route([[token]], cache)`` per request (tested; the fused norms and SiLU to rounding),
so the engine's outputs still equal HF ``generate``'s.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from readmoe.model.pregating import RouterCache, sticky_argmax
from readmoe.serve import cpu_ops
from readmoe.serve.packed import PackedMatrix

if TYPE_CHECKING:
    from readmoe.serve.router_graphs import GraphedRouter


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


class PagedRouter:
    """A pre-gating model's router with its keys and values in pools of ``num_slots`` slots,
    addressed by the backbone KV cache's slots (``PagedKVCache.slots``): a request's token at
    position p keeps its router key and value where its backbone ones go. ``ops``: the fused
    CPU ops (``cpu_ops.ops_for``), or None for torch ops."""

    def __init__(self, model: torch.nn.Module, num_slots: int,
                 ops: ModuleType | None = None) -> None:
        self.model = model
        self.router = model.model.router
        if self.router is None:
            raise ValueError("PagedRouter needs a pre-gating model (model.model.router)")
        self.margin = float(model.config.router_hysteresis)
        block = self.router.blocks[0]
        self.heads, self.head_dim = block.heads, block.head_dim
        weight = self.router.embed.weight
        shape = (num_slots, self.heads, self.head_dim)
        self.keys = [weight.new_zeros(shape) for _ in self.router.blocks]
        self.values = [weight.new_zeros(shape) for _ in self.router.blocks]
        half = self.head_dim // 2
        # RoPE factors of every position a slot can hold, as rotary() computes them (so they
        # round alike), cos twice and sin with its first half negated: [slots, d] each
        freqs = block.theta ** (-torch.arange(half, dtype=torch.float32,
                                              device=weight.device) / half)  # [d/2]
        angles = torch.arange(num_slots, device=weight.device).to(torch.float32)[:, None] * freqs
        cos, sin = angles.cos().to(weight.dtype), angles.sin().to(weight.dtype)
        self._cos, self._sin = torch.cat([cos, cos], -1), torch.cat([-sin, sin], -1)
        # the fused ops' Router: [in, out] matrices (and their panels for 2-48 rows, where the
        # runner's have them), one call a step
        self._native = self._fused(ops) if ops is not None else None
        self.graphs: GraphedRouter | None = None  # CUDA graphs of the step (the engine's)

    @torch.inference_mode()
    def route_prompt(self, prompt_ids: Sequence[int], slots: torch.Tensor) -> list[int]:
        """The prompt's experts (``model.route``, hysteresis included); its router keys and
        values go to ``slots`` [T] (the prompt's backbone slots)."""
        if len(slots) != len(prompt_ids):
            raise ValueError(f"{len(slots)} slots for a prompt of {len(prompt_ids)} tokens")
        cache = RouterCache()
        experts = prompt_experts(self.model, prompt_ids, cache)
        slots = slots.to(self.keys[0].device)
        for layer, (keys, values) in enumerate(zip(cache.keys, cache.values, strict=True)):
            # [1, heads, T, d] -> [T, heads, d]
            self.keys[layer].index_copy_(0, slots, keys[0].transpose(0, 1))
            self.values[layer].index_copy_(0, slots, values[0].transpose(0, 1))
        return experts

    @torch.inference_mode()
    def step(self, tokens: Sequence[int], context_slots: Sequence[torch.Tensor],
             previous: Sequence[int]) -> list[int]:
        """The expert of each ``tokens[i]``: the token at the last position of a request whose
        slots for positions 0 .. that one are ``context_slots[i]``; ``previous[i]`` is the
        expert of the token before it (hysteresis; -1: none). Writes the tokens' keys and
        values."""
        if not tokens:
            return []
        if self._native is not None:
            return self._native.step(list(tokens), list(context_slots), list(previous))
        if self.graphs is not None and self.graphs.fits(context_slots):
            return self.graphs(tokens, context_slots, previous)
        device = self.keys[0].device
        lengths = torch.tensor([len(s) for s in context_slots], device=device)  # [S]
        # [S, L] each request's context slots, padded with slot 0 (never read: lengths)
        key_slots = torch.nn.utils.rnn.pad_sequence(list(context_slots),
                                                    batch_first=True).to(device)
        return self.experts(torch.tensor(tokens, device=device), key_slots, lengths,
                            torch.tensor(list(previous), device=device)).tolist()

    def experts(self, tokens: torch.Tensor, key_slots: torch.Tensor, lengths: torch.Tensor,
                previous: torch.Tensor) -> torch.Tensor:
        """``step`` on tensors, every shape fixed by its inputs (so a CUDA graph can hold
        it, ``router_graphs``): tokens [S], key_slots [S, L] (past each row's length: any
        slot, masked), lengths [S], previous [S] -> experts [S]."""
        write = key_slots.gather(1, (lengths - 1)[:, None])[:, 0]  # [S]
        cos, sin = self._cos.index_select(0, lengths - 1), self._sin.index_select(0, lengths - 1)
        x = self.router.embed(tokens)  # [S, dim]
        for layer, block in enumerate(self.router.blocks):
            qkv = block.qkv(block.attn_norm(x))  # [S, 3 * dim]
            x = x + block.out(self._attend(layer, qkv, cos, sin, write, key_slots, lengths))
            h = block.mlp_norm(x)
            x = x + block.down(F.silu(block.gate(h)) * block.up(h))
        logits = self.router.head(self.router.norm(x))  # [S, E]
        return sticky_argmax(logits[:, None], self.margin, previous)[:, 0]

    def _fused(self, ops: ModuleType) -> object:
        """The router as the fused ops' ``Router``: each block two of the runner's layer calls
        (``decode_attention_block``, then ``moe_ffn``'s shared expert for the MLP), the norms
        and SiLU equal the router's own to rounding."""
        router, panels = self.router, cpu_ops.panels_apply(ops)

        def matrix(*weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
            packed = PackedMatrix.of(*weights, prepack=panels, panels=panels)  # as the runner's
            return packed.weight, packed.blocked

        native = ops.Router(router.embed.weight, self.heads, 1.0 / math.sqrt(self.head_dim),
                            self.margin, self._cos, self._sin, router.norm.weight,
                            router.norm.eps, router.head.weight.t().contiguous())
        for block, keys, values in zip(router.blocks, self.keys, self.values, strict=True):
            native.add_block(block.attn_norm.weight, block.attn_norm.eps,
                             *matrix(block.qkv.weight), *matrix(block.out.weight),
                             block.mlp_norm.weight, block.mlp_norm.eps,
                             [*matrix(block.gate.weight, block.up.weight),
                              *matrix(block.down.weight)], keys, values)
        return native

    def _attend(self, layer: int, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                write: torch.Tensor, key_slots: torch.Tensor, lengths: torch.Tensor
                ) -> torch.Tensor:
        """qkv [S, 3 * dim] -> each request's one query attended over its context [S, dim];
        RoPE as ``rotary`` (x * cos + roll(x, d/2) * sin with sin's first half negated, the
        same products), the new keys and values written at ``write`` first."""
        keys, values = self.keys[layer], self.values[layer]
        count, heads, dim = qkv.shape[0], self.heads, self.head_dim
        q, k, v = qkv.view(count, 3, heads, dim).unbind(1)  # [S, heads, d] each
        q, k = (t * cos[:, None] + t.roll(dim // 2, -1) * sin[:, None] for t in (q, k))
        keys.index_copy_(0, write, k)
        values.index_copy_(0, write, v)
        width = key_slots.shape[1]
        flat = key_slots.reshape(-1)
        gathered = [pool.index_select(0, flat).view(count, width, heads, dim).transpose(1, 2)
                    for pool in (keys, values)]  # [S, heads, L, d] each
        allowed = (torch.arange(width, device=qkv.device)[None, :]
                   < lengths[:, None])[:, None, None]  # [S, 1, 1, L]
        out = F.scaled_dot_product_attention(q[:, :, None], *gathered, attn_mask=allowed,
                                             scale=1.0 / math.sqrt(dim))  # [S, heads, 1, d]
        return out.reshape(count, heads * dim)

