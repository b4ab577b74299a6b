"""A paged KV cache: one preallocated pool per layer, handed out in fixed-size blocks.

Pools are allocated once (``[num_blocks * block_size + 1, kv_heads, head_dim]`` for K and for
V, per layer: the last slot is a spare no request owns), so serving never reallocates or
concatenates tensors; a request owns a list of block numbers (its block table) and its token
at position p lives in slot ``table[p // block_size] * block_size + p % block_size`` of the
flattened pool.

The pools may hold a narrower dtype than the model computes in (``KV_DTYPES``: float16 on a
float32 model, as llama.cpp's default cache): half the bytes a decode step's attention reads
and half the memory per token. Keys and values are rounded to it when written (to nearest
even) and widened exactly when read, so attention computes in the model's dtype over the
rounded values.

The accounting (admission reserves, allocation grows, no preemption) is ``BlockAllocator``'s
(kv_blocks.py); the simulator uses the same allocator, so it admits as the engine does.
"""

from __future__ import annotations

import torch

from readmoe.errors import ReadmoeError
from readmoe.serve.kv_blocks import BlockAllocator

# the engine's kv_dtype choices: "auto" keeps the model's dtype
KV_DTYPES = {"auto": None, "float16": torch.float16}


def kv_dtype_of(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The pools' dtype for the ``kv_dtype`` option ``name`` on a model computing in
    ``model_dtype``."""
    if name not in KV_DTYPES:
        raise ReadmoeError(f"--kv-dtype {name!r}: choose one of {', '.join(KV_DTYPES)}")
    return KV_DTYPES[name] or model_dtype


class PagedKVCache(BlockAllocator):
    """Per-layer K/V pools plus a block allocator with per-request block tables."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int,
                 head_dim: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        super().__init__(num_blocks, block_size)
        # flattened [blocks * size, ...], and one spare slot past every block's
        shape = (num_blocks * block_size + 1, kv_heads, head_dim)
        # no request's: the padding rows of a captured decode step write and read it (graphs.py)
        self.spare_slot = num_blocks * block_size
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        # per request: the block table its slots were made from, and those slots (every
        # position its blocks hold): a decode step asks each request for its context's slots
        # again, and its table changes only once per block_size tokens
        self._slots: dict[str, tuple[list[int], torch.Tensor]] = {}

    def slots(self, request_id: str, start: int, count: int) -> torch.Tensor:
        """Flat pool slots of positions ``start .. start + count - 1`` -> [count] int64 (a
        read-only view: the cache reuses it)."""
        table = self.table(request_id)
        cached = self._slots.get(request_id)
        if cached is None or cached[0] != table:
            blocks = torch.tensor(table, dtype=torch.long)[:, None]  # [blocks, 1]
            every = (blocks * self.block_size + torch.arange(self.block_size)).reshape(-1)
            cached = self._slots[request_id] = (list(table), every)
        if start < 0 or count < 0 or start + count > len(cached[1]):
            raise IndexError(f"positions {start}..{start + count - 1} of request {request_id} "
                             f"are outside its {len(table)} blocks of {self.block_size}")
        return cached[1][start:start + count]

    def free(self, request_id: str) -> None:
        self._slots.pop(request_id, None)
        super().free(request_id)

    def write(self, layer: int, slots: torch.Tensor, keys: torch.Tensor,
              values: torch.Tensor) -> None:
        """Store keys/values [N, kv_heads, head_dim] of N tokens at their ``slots`` [N] (rounded
        to the pools' dtype)."""
        pool = self.keys[layer]
        pool.index_copy_(0, slots, keys.to(pool.dtype))
        self.values[layer].index_copy_(0, slots, values.to(pool.dtype))
