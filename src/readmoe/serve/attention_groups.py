"""Chunks of a step grouped for one padded attention call each.

Why its own shapes: a step's chunks differ in length and in how much cached context they
have, so each group pads its queries to the longest chunk and its keys to the longest context
(pool slots gathered per chunk) and masks what is padding or in a chunk's future; a
decode-only group (``direct``) needs no gather or scatter at all. The runner (``runner.py``)
makes the groups once a step and every layer reuses them; the CUDA-graph step
(``graphs.py``) builds its fixed-shape one directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from readmoe.serve.runner import RunnerChunk


@dataclass(frozen=True)
class AttentionGroup:
    """Chunks attended in one padded call: queries [B, Tq] against keys [B, L].

    ``direct``: every row of the step is one decode query, in row order (a decode-only step),
    so queries are the rows as they are and the result is the output as it is: no gather or
    scatter, and the mask broadcasts over heads instead of being repeated.
    """

    query_rows: torch.Tensor  # [B, Tq] rows of the flat batch (padding: row 0)
    key_slots: torch.Tensor  # [B, L] pool slots (padding: slot 0)
    bias: torch.Tensor | None  # [B, 1, groups * Tq, L] (direct: [B, 1, 1, L]) 0 = attend,
    # -inf not; None where the fused decode attention reads lengths instead
    valid: torch.Tensor  # [V] positions in the flattened [B * Tq] that are real queries
    targets: torch.Tensor  # [V] their rows in the flat batch
    lengths: torch.Tensor  # [B] each chunk's context length (its real keys)
    direct: bool = False


def group_chunks(chunks: Sequence[RunnerChunk], offsets: Sequence[int], groups: int,
                 dtype: torch.dtype, device: torch.device, direct: bool = False,
                 masked: bool = True) -> AttentionGroup:
    """One group of ``chunks`` (their first rows in the flat batch: ``offsets``); ``groups``
    query heads share a KV head (the mask repeats per group); ``masked`` False: the fused
    decode attention reads slots and lengths, no mask."""
    if direct and not masked:  # what the fused decode attention reads: slots and lengths
        key_slots = torch.nn.utils.rnn.pad_sequence([c.context_slots for c in chunks],
                                                    batch_first=True)  # [B, L], padding 0
        rows = torch.arange(len(chunks))
        lengths = torch.tensor([len(c.context_slots) for c in chunks])
        return AttentionGroup(*(t.to(device) for t in (rows[:, None], key_slots)), None,
                               *(t.to(device) for t in (rows, rows, lengths)), direct=True)
    sizes = [len(c.tokens) for c in chunks]
    ends = [c.start + n for c, n in zip(chunks, sizes, strict=True)]
    width, length = max(sizes), max(ends)
    query_rows = torch.zeros(len(chunks), width, dtype=torch.long)
    key_slots = torch.zeros(len(chunks), length, dtype=torch.long)
    for b, (chunk, size, offset) in enumerate(zip(chunks, sizes, offsets, strict=True)):
        query_rows[b, :size] = torch.arange(offset, offset + size)
        key_slots[b, :ends[b]] = chunk.context_slots
    valid = (torch.arange(width)[None, :] < torch.tensor(sizes)[:, None]).reshape(-1)
    targets = query_rows.reshape(-1)[valid]
    bias = None
    if masked:
        starts = torch.tensor([c.start for c in chunks])[:, None, None]  # [B, 1, 1]
        keys = torch.arange(length)[None, None, :]  # [1, 1, L]
        queries = torch.arange(width)[None, :, None]  # [1, Tq, 1]
        # Query i of a chunk sits at position start + i and sees keys up to it; a padding
        # query (i >= size) sees the request's keys too, so its softmax row is never empty.
        mask = (keys <= starts + queries) & (keys < torch.tensor(ends)[:, None, None])
        bias = torch.zeros(mask.shape, dtype=dtype).masked_fill_(~mask, float("-inf"))
        # query rows are (GQA group, query) pairs, group-major: the mask repeats per group
        bias = (bias[:, None] if direct else bias[:, None].repeat(1, 1, groups, 1)).to(device)
    query_rows, key_slots, valid, targets, lengths = (t.to(device) for t in (
        query_rows, key_slots, valid.nonzero()[:, 0], targets, torch.tensor(ends)))
    return AttentionGroup(query_rows, key_slots, bias, valid, targets, lengths, direct=direct)
