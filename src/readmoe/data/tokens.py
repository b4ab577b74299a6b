"""Tokenising and packing documents into fixed-length blocks, shared by every stage.

Documents are tokenised without special tokens, joined by the tokenizer's end-of-sequence
token (the document boundary the model saw in pre-training), concatenated into one stream,
and cut into blocks of `block_size` tokens; a trailing partial block is dropped so every
block is full. Only as many documents are tokenised as the requested tokens need.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from readmoe.errors import ReadmoeError

TOKENIZE_CHUNK = 64


def separator_id(tokenizer) -> int:
    for name in ("eos_token_id", "sep_token_id", "bos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    raise ReadmoeError("the tokenizer defines no end-of-sequence token to separate documents")


def token_stream(tokenizer, texts: Iterable[str], max_tokens: int | None = None) -> list[int]:
    """Token ids of `texts` joined by the separator, stopping once `max_tokens` are collected."""
    sep = separator_id(tokenizer)
    stream: list[int] = []
    batch: list[str] = []

    def flush() -> None:
        encoded = tokenizer(batch, add_special_tokens=False)["input_ids"]
        for ids in encoded:
            stream.extend(ids)
            stream.append(sep)
        batch.clear()

    for text in texts:
        batch.append(text)
        if len(batch) == TOKENIZE_CHUNK:
            flush()
            if max_tokens is not None and len(stream) >= max_tokens:
                break
    if batch and (max_tokens is None or len(stream) < max_tokens):
        flush()
    return stream if max_tokens is None else stream[:max_tokens]


def pack_blocks(tokenizer, texts: Iterable[str], block_size: int,
                max_tokens: int | None = None) -> torch.Tensor:
    """Pack documents into `[num_blocks, block_size]` int64 blocks (at most `max_tokens`)."""
    if block_size < 2:
        raise ReadmoeError(f"block size must be at least 2 tokens, got {block_size}")
    stream = token_stream(tokenizer, texts, max_tokens)
    num_blocks = len(stream) // block_size
    if num_blocks == 0:
        raise ReadmoeError(f"only {len(stream)} tokens available, fewer than one block of "
                           f"{block_size}; add documents or lower the block size")
    return torch.tensor(stream[: num_blocks * block_size], dtype=torch.long).view(
        num_blocks, block_size)
