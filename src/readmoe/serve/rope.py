"""The runner's RoPE factors: transformers' rotary embedding, per step or from a table.

Why: a decode step needs the factors of one position per request. Computing them per step is
eight ATen calls (transformers' ``rotary_emb`` and the sign flip below), slow at decode sizes;
where the factors of a position do not depend on the rest of the sequence (every rope type but
``dynamic`` and ``longrope``, which rescale by length) they are computed once per position and
looked up. Both ways give the same bits: each factor is one product ``inv_freq * position``
then ``cos`` / ``sin`` (and the scaling), element by element, and the table is built in calls
of at most ``CHUNK`` positions, like a step's (so each call runs on one thread, vectorized
alike).
"""

from __future__ import annotations

import torch

# rope types whose inverse frequencies change with the sequence's length (transformers'
# ``dynamic_rope_update``): no table
DYNAMIC = frozenset({"dynamic", "longrope"})
CHUNK = 256  # positions per table-building call


class RopeFactors:
    """cos and sin [N, D] of positions [N], as the runner multiplies them: sin with its first
    half negated (``rotate_half(x) * sin == roll(x, D/2) * sin'``, exactly)."""

    def __init__(self, rotary_emb: torch.nn.Module, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.rotary_emb = rotary_emb
        self.dtype, self.device = dtype, device
        self.static = getattr(rotary_emb, "rope_type", "default") not in DYNAMIC
        self._cos = self._sin = torch.empty(0, 0, dtype=dtype, device=device)

    def of(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [N, D] of ``positions`` [N], computed now."""
        like = torch.empty(0, dtype=self.dtype, device=self.device)
        cos, sin = self.rotary_emb(like, positions[None])  # [1, N, D] each
        cos, sin = cos[0], sin[0]
        half = sin.shape[-1] // 2
        return cos, torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)

    def rows(self, positions: list[int]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """(cos, sin, rows): position i's factors are row ``rows[i]`` of cos and sin; a table
        grown to cover ``positions`` where the rope type allows, else this step's own."""
        if not self.static:
            cos, sin = self.of(torch.tensor(positions, device=self.device))
            return cos, sin, list(range(len(positions)))
        needed = max(positions) + 1
        if needed > self._cos.shape[0]:
            self._grow(max(needed, 2 * self._cos.shape[0]))
        return self._cos, self._sin, positions

    def _grow(self, length: int) -> None:
        start = self._cos.shape[0]
        parts = [self.of(torch.arange(begin, min(begin + CHUNK, length), device=self.device))
                 for begin in range(start, length, CHUNK)]
        kept = [(self._cos, self._sin)] if start else []
        self._cos = torch.cat([c for c, _ in kept + parts])
        self._sin = torch.cat([s for _, s in kept + parts])
