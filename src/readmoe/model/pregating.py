"""The pre-gating router: one tiny causal transformer over token ids for all layers.

Read-ME's router G reads token ids, not backbone hidden states, so token t's expert is known
as soon as token t is known: for a prompt all at once, in decoding right after sampling,
before the backbone step that needs it. Shape (paper Table 1): 1 layer, 4 heads, SwiGLU,
RoPE, RMSNorm, its own embedding. Unlike the authors' code it keeps a real KV cache (a decode
step does O(1) projections plus one attention row, and equals a full recompute) and scales
attention by 1/sqrt(head_dim).

This file is copied into saved model folders (trust_remote_code), so it imports only torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


def default_router_dim(hidden_size: int) -> int:
    """Router width proportionate to the backbone: hidden/4 rounded down to a multiple of 32,
    within [64, 512] (Llama-2-7B: 4096 -> 512, the paper's; SmolLM2-135M: 576 -> 128)."""
    return max(64, min(512, (hidden_size // 4) // 32 * 32))


class RouterRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(variance + self.eps)).to(x.dtype) * self.weight


def rotary(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate halves of `x` ([B, heads, T, d]) by position-dependent angles (RoPE)."""
    half = x.shape[-1] // 2
    freqs = theta ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angles = positions.to(torch.float32)[:, None] * freqs[None, :]  # [T, d/2]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


@dataclass
class RouterCache:
    """Keys and values of every router layer for the tokens seen so far, per sequence batch."""

    keys: list[torch.Tensor] = field(default_factory=list)  # per layer [B, heads, T, d]
    values: list[torch.Tensor] = field(default_factory=list)
    experts: torch.Tensor | None = None  # [B, T] the expert chosen for each token (hysteresis)

    @property
    def length(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if layer == len(self.keys):
            self.keys.append(k)
            self.values.append(v)
        else:
            self.keys[layer] = torch.cat([self.keys[layer], k], dim=2)
            self.values[layer] = torch.cat([self.values[layer], v], dim=2)
        return self.keys[layer], self.values[layer]

    def crop(self, length: int) -> None:
        """Keep the first `length` tokens: the router is causal, so their keys and values are
        still exact after the later tokens are rolled back (assisted decoding, a reset cache)."""
        if length == 0:
            self.keys, self.values = [], []  # a new sequence batch may have another batch size
            self.experts = None
            return
        self.keys = [k[:, :, :length] for k in self.keys]
        self.values = [v[:, :, :length] for v in self.values]
        if self.experts is not None:
            self.experts = self.experts[:, :length]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows `index` ([B'] int), in that order (beam search's surviving beams)."""
        self.keys = [k.index_select(0, index.to(k.device)) for k in self.keys]
        self.values = [v.index_select(0, index.to(v.device)) for v in self.values]
        if self.experts is not None:
            self.experts = self.experts.index_select(0, index.to(self.experts.device))

    def previous_experts(self) -> torch.Tensor | None:
        """[B] the expert chosen for each sequence's latest token, or None before any."""
        return None if self.experts is None or not self.experts.shape[1] else self.experts[:, -1]

    def record(self, chosen: torch.Tensor) -> None:
        """Append the experts chosen for the tokens just routed, [B, T]."""
        self.experts = chosen if self.experts is None else torch.cat([self.experts, chosen], 1)


def sticky_argmax(logits: torch.Tensor, margin: float, previous: torch.Tensor | None = None,
                  valid: torch.Tensor | None = None) -> torch.Tensor:
    """Experts [B, T] from router logits [B, T, E] with hysteresis: token t keeps the expert of
    token t - 1 unless the best logit beats that expert's by more than ``margin``; margin 0 is
    plain argmax. ``previous`` [B]: the expert of the token before the first one here (a cached
    sequence; -1 where there is none), else each row's first token takes its argmax. ``valid``
    [B, T] (False at padding): a padding token takes its argmax and hands nothing on, so a
    left-padded sequence routes as it would unpadded. A scan over T: each choice depends on the
    one before."""
    best = logits.argmax(-1)  # [B, T]
    if margin == 0:
        return best
    top = logits.max(-1).values  # [B, T]
    carried = (previous.clone() if previous is not None
               else torch.full_like(best[:, 0], -1))  # [B], -1: nothing to keep
    chosen = torch.empty_like(best)
    for t in range(logits.shape[1]):
        held = carried >= 0
        score = logits[:, t].gather(1, carried.clamp_min(0)[:, None])[:, 0]  # [B]
        pick = torch.where(held & (score >= top[:, t] - margin), carried, best[:, t])
        if valid is not None:
            pick = torch.where(valid[:, t], pick, best[:, t])
            carried = torch.where(valid[:, t], pick, carried)
        else:
            carried = pick
        chosen[:, t] = pick
    return chosen


class RouterBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_dim: int, theta: float, eps: float) -> None:
        super().__init__()
        if dim % heads or (dim // heads) % 2:
            raise ValueError(f"router dim {dim} must split into {heads} heads of even size")
        self.heads, self.head_dim, self.theta = heads, dim // heads, theta
        self.attn_norm = RouterRMSNorm(dim, eps)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.mlp_norm = RouterRMSNorm(dim, eps)
        self.gate = nn.Linear(dim, mlp_dim, bias=False)
        self.up = nn.Linear(dim, mlp_dim, bias=False)
        self.down = nn.Linear(mlp_dim, dim, bias=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, layer: int,
                cache: RouterCache | None, past: int = 0,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`past` = tokens already in `cache` before this call (positions start there);
        `key_mask` [B, past + T] bool, False at padding, which no query attends to."""
        batch, steps, dim = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).split(dim, dim=-1)
        q, k, v = (t.view(batch, steps, self.heads, self.head_dim).transpose(1, 2)
                   for t in (q, k, v))  # [B, heads, T, d]
        q, k = rotary(q, positions, self.theta), rotary(k, positions, self.theta)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        # query i (absolute position past + i) attends to keys 0 .. past + i
        keys = torch.arange(past + steps, device=x.device)  # [past+T]
        queries = past + torch.arange(steps, device=x.device)  # [T]
        allowed = keys[None, :] <= queries[:, None]  # [T, past+T]
        if key_mask is not None:
            # A query always sees itself, so a padding query's row is never empty (no NaN).
            allowed = ((allowed & key_mask[:, None, None, :])
                       | (keys[None, :] == queries[:, None]))  # [B, 1, T, past+T]
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed,
                                              scale=1.0 / math.sqrt(self.head_dim))
        x = x + self.out(attn.transpose(1, 2).reshape(batch, steps, dim))
        h = self.mlp_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class PreGatingRouter(nn.Module):
    """Token ids `[B, T]` -> expert logits `[B, T, E]`, causal, with its own KV cache."""

    def __init__(self, vocab_size: int, num_experts: int, dim: int = 128, layers: int = 1,
                 heads: int = 4, mlp_dim: int | None = None, rope_theta: float = 10000.0,
                 eps: float = 1e-6) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.blocks = nn.ModuleList(RouterBlock(dim, heads, mlp_dim or dim, rope_theta, eps)
                                    for _ in range(layers))
        self.norm = RouterRMSNorm(dim, eps)
        self.head = nn.Linear(dim, num_experts, bias=False)

    def forward(self, input_ids: torch.Tensor, cache: RouterCache | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`attention_mask`: [B, past + T] 1 for tokens, 0 for padding (HF's 2D mask, covering
        the cached tokens too). Without it every token is real. RoPE is relative, so with the
        mask a left-padded sequence routes as it would unpadded."""
        start = cache.length if cache is not None else 0
        batch, steps = input_ids.shape
        key_mask = None
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (batch, start + steps):
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; the "
                                 f"router expects [batch, cached + new] = [{batch}, "
                                 f"{start + steps}]")
            key_mask = attention_mask.to(device=input_ids.device, dtype=torch.bool)
        positions = torch.arange(start, start + steps, device=input_ids.device)
        x = self.embed(input_ids)  # [B, T, dim]
        for layer, block in enumerate(self.blocks):
            x = block(x, positions, layer, cache, start, key_mask)
        return self.head(self.norm(x))  # [B, T, E]

    @torch.no_grad()
    def init_embedding_from(self, backbone_embedding: torch.Tensor) -> None:
        """Start from the backbone's embedding projected onto its top principal directions
        (the best linear compression to the router's width), scaled to the init's RMS."""
        table = backbone_embedding.detach().float()  # [V, H]
        dim = self.embed.weight.shape[1]
        centred = table - table.mean(dim=0, keepdim=True)
        rank = min(dim, *centred.shape)
        _, _, basis = torch.linalg.svd(centred[:: max(1, table.shape[0] // 8192)],
                                       full_matrices=False)
        projected = centred @ basis[:rank].T  # [V, rank]
        projected = projected / projected.pow(2).mean().sqrt().clamp_min(1e-8) * 0.02
        self.embed.weight.zero_()
        self.embed.weight[:, :rank] = projected.to(self.embed.weight.dtype)
