"""A paged KV cache: one preallocated pool per layer, handed out in fixed-size blocks.

Pools are allocated once (``[num_blocks, block_size, kv_heads, head_dim]`` for K and for V,
per layer), so serving never reallocates or concatenates tensors; a request owns a list of
block numbers (its block table) and its token at position p lives in slot
``table[p // block_size] * block_size + p % block_size`` of the flattened pool.

The accounting (admission reserves, allocation grows, no preemption) is ``BlockAllocator``'s
(kv_blocks.py); the simulator uses the same allocator, so it admits as the engine does.
"""

from __future__ import annotations

import torch

from readmoe.serve.kv_blocks import BlockAllocator


class PagedKVCache(BlockAllocator):
    """Per-layer K/V pools plus a block allocator with per-request block tables."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int,
                 head_dim: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        super().__init__(num_blocks, block_size)
        shape = (num_blocks * block_size, kv_heads, head_dim)  # flattened [blocks * size, ...]
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    def slots(self, request_id: str, start: int, count: int) -> torch.Tensor:
        """Flat pool slots of positions ``start .. start + count - 1`` -> [count] int64."""
        table = torch.tensor(self.table(request_id), dtype=torch.long)  # [blocks]
        positions = torch.arange(start, start + count)
        return table[positions // self.block_size] * self.block_size + positions % self.block_size

    def write(self, layer: int, slots: torch.Tensor, keys: torch.Tensor,
              values: torch.Tensor) -> None:
        """Store keys/values [N, kv_heads, head_dim] of N tokens at their ``slots`` [N]."""
        self.keys[layer].index_copy_(0, slots, keys)
        self.values[layer].index_copy_(0, slots, values)
