"""The KV cache's block accounting, without tensors: what the engine and the simulator share.

Admission reserves, allocation grows. ``admit`` reserves the blocks a request may ever need
(prompt + every fed-back output), ``grow`` takes blocks from the free list only as tokens
arrive, and ``free`` returns both the blocks and the unused reservation. Since a running
request's growth is always covered by its reservation, a step never runs out of blocks and no
request is ever preempted; the price is that blocks reserved for outputs a request will not
produce (early EOS) stay unusable for new admissions until it ends.

The engine's ``PagedKVCache`` holds one of these next to its tensor pools; the simulator holds
one alone, so both admit exactly the same requests at the same steps.
"""

from __future__ import annotations

from readmoe.errors import ReadmoeError


class BlockAllocator:
    """Fixed-size blocks, per-request block tables and reservations."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ReadmoeError("a KV cache needs at least one block of at least one token")
        self.num_blocks = num_blocks
        self.block_size = block_size
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
    def num_in_use(self) -> int:
        """Blocks allocated to requests (not counting reservations)."""
        return self.num_blocks - len(self._free)

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

    def table(self, request_id: str) -> list[int]:
        """The request's block numbers, in position order."""
        return self._tables[request_id]
