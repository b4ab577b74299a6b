from __future__ import annotations

import pytest

from readmoe.data.tokens import pack_blocks, token_stream
from readmoe.errors import ReadmoeError


def test_stream_joins_documents_with_eos(tokenizer):
    stream = token_stream(tokenizer, ["ab", "c"])
    eos = tokenizer.eos_token_id
    assert stream == tokenizer("ab")["input_ids"] + [eos] + tokenizer("c")["input_ids"] + [eos]


def test_pack_blocks_drops_partial_and_caps(tokenizer):
    texts = ["x" * 50, "y" * 50]
    blocks = pack_blocks(tokenizer, texts, block_size=16)
    assert blocks.shape == (102 // 16, 16)
    capped = pack_blocks(tokenizer, texts, block_size=16, max_tokens=40)
    assert capped.shape == (2, 16)
    assert capped.flatten().tolist() == blocks.flatten()[:32].tolist()


def test_too_little_text_is_a_clear_error(tokenizer):
    with pytest.raises(ReadmoeError, match="fewer than one block"):
        pack_blocks(tokenizer, ["hi"], block_size=64)
