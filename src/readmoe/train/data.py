"""A deterministic stream of training blocks that mixes every domain and advances across
phases and rounds, so no two phases see the same blocks until the data wraps around."""

from __future__ import annotations

import torch

from readmoe.data.tokens import pack_blocks
from readmoe.errors import ReadmoeError


def blocks_per_domain(corpus, blocks_needed: int) -> int:
    """The most blocks `mixed_blocks` cuts from any one domain (the front of its train split)."""
    return -(-blocks_needed // len(corpus.domains))


def mixed_blocks(corpus, tokenizer, block_size: int, blocks_needed: int) -> torch.Tensor:
    """`[N, block]` training blocks, domains interleaved round-robin (a, b, c, a, b, c, ...),
    each domain contributing at most its share of `blocks_needed` (fewer if it is small)."""
    per_domain = blocks_per_domain(corpus, blocks_needed)
    packed = []
    for domain in corpus.domains:
        try:
            packed.append(pack_blocks(tokenizer, corpus.documents(domain, "train"), block_size,
                                      per_domain * block_size))
        except ReadmoeError:
            continue  # a domain too small for one block contributes nothing
    if not packed:
        raise ReadmoeError(f"no domain has a full training block of {block_size} tokens")
    longest = max(p.shape[0] for p in packed)
    rows = [p[i] for i in range(longest) for p in packed if i < p.shape[0]]
    return torch.stack(rows)


class BlockSchedule:
    """Hands out consecutive batches of a fixed block list, wrapping around at the end.

    The position is a plain integer that phases advance and checkpoints store, so a resumed
    run reads exactly the blocks an uninterrupted one would.
    """

    def __init__(self, blocks: torch.Tensor, batch_size: int) -> None:
        self.blocks, self.batch_size = blocks, batch_size

    def indices(self, step: int) -> torch.Tensor:
        """Row numbers of the `step`-th batch since the start of training: `[batch]`."""
        count = self.blocks.shape[0]
        return (torch.arange(self.batch_size) + step * self.batch_size) % count

    def batch(self, step: int) -> torch.Tensor:
        """The `step`-th batch: `[batch, block]`."""
        return self.blocks[self.indices(step)]

    def epochs(self, steps: int) -> float:
        return steps * self.batch_size / self.blocks.shape[0]
