"""A paged KV cache: one preallocated pool per layer, handed out in fixed-size blocks.

Pools are allocated once (``[num_blocks, block_size, kv_heads, head_dim]`` for K and for V,
per layer), so serving never reallocates or concatenates tensors; a request owns a list of
block numbers (its block table) and its token at position p lives in slot
``table[p // block_size] * block_size + p % block_size`` of the flattened pool.

Admission reserves, allocation grows. ``admit`` reserves the blocks a request may ever need
(prompt + every fed-back output), ``grow`` takes blocks from the free list only as tokens
arrive, and ``free`` returns both the blocks and the unused reservation. Since a running
request's growth is always covered by its reservation, a step never runs out of blocks and no
request is ever preempted; the price is that blocks reserved for outputs a request will not
produce (early EOS) stay unusable for new admissions until it ends.
"""

from __future__ import annotations

import torch

from readmoe.errors import ReadmoeError


class PagedKVCache:
    """Per-layer K/V pools plus a block allocator with per-request block tables."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int,
                 head_dim: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        if num_blocks < 1 or block_size < 1:
            raise ReadmoeError("a KV cache needs at least one block of at least one token")
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = (num_blocks * block_size, kv_heads, head_dim)  # flattened [blocks * size, ...]
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() gives block 0 first
        self._tables: dict[str, list[int]] = {}
        self._reserved: dict[str, int] = {}  # blocks each request may still take

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def num_free(self) -> int:
        """Blocks on the free list (some may be reserved by admitted requests)."""
        return len(self._free)

    @property
    def num_available(self) -> int:
        """Blocks neither allocated nor reserved: what a new admission may claim."""
        return len(self._free) - sum(self._reserved.values())

    def can_admit(self, num_tokens: int) -> bool:
        """Whether a request that may hold ``num_tokens`` tokens fits next to the admitted."""
        return self.blocks_for(num_tokens) <= self.num_available

    def admit(self, request_id: str, num_tokens: int) -> None:
        """Reserve room for ``num_tokens`` tokens of a new request."""
        if request_id in self._tables:
            raise ReadmoeError(f"request {request_id!r} already holds KV blocks")
        if not self.can_admit(num_tokens):
            raise ReadmoeError(f"no KV room for request {request_id!r} ({num_tokens} tokens, "
                               f"{self.num_available} free blocks of {self.block_size})")
        self._tables[request_id] = []
        self._reserved[request_id] = self.blocks_for(num_tokens)

    def grow(self, request_id: str, num_tokens: int) -> None:
        """Make the request's table cover its first ``num_tokens`` tokens."""
        table = self._tables[request_id]
        needed = self.blocks_for(num_tokens) - len(table)
        if needed > self._reserved[request_id]:
            raise ReadmoeError(f"request {request_id!r} outgrew its KV reservation "
                               f"({num_tokens} tokens)")
        for _ in range(max(0, needed)):
            table.append(self._free.pop())
        self._reserved[request_id] -= max(0, needed)

    def free(self, request_id: str) -> None:
        """Return a finished or aborted request's blocks and reservation (no-op if unknown)."""
        self._free.extend(reversed(self._tables.pop(request_id, [])))
        self._reserved.pop(request_id, None)

    def holds(self, request_id: str) -> bool:
        return request_id in self._tables

    def slots(self, request_id: str, start: int, count: int) -> torch.Tensor:
        """Flat pool slots of positions ``start .. start + count - 1`` -> [count] int64."""
        table = torch.tensor(self._tables[request_id], dtype=torch.long)  # [blocks]
        positions = torch.arange(start, start + count)
        return table[positions // self.block_size] * self.block_size + positions % self.block_size

    def write(self, layer: int, slots: torch.Tensor, keys: torch.Tensor,
              values: torch.Tensor) -> None:
        """Store keys/values [N, kv_heads, head_dim] of N tokens at their ``slots`` [N]."""
        self.keys[layer].index_copy_(0, slots, keys)
        self.values[layer].index_copy_(0, slots, values)
