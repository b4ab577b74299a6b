"""RopeFactors: the table's rows are the bits transformers' rotary embedding gives a step, and
a length-dependent rope type is computed per step."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, rotate_half

from readmoe.serve.rope import CHUNK, RopeFactors


def rotary(scaling: dict | None) -> LlamaRotaryEmbedding:
    config = LlamaConfig(hidden_size=128, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=2048, rope_theta=10000.0,
                         rope_scaling=scaling)
    return LlamaRotaryEmbedding(config)


SCALINGS = [None, {"rope_type": "linear", "factor": 2.0},
            {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
             "high_freq_factor": 4.0, "original_max_position_embeddings": 512}]


@pytest.mark.parametrize("scaling", SCALINGS)
def test_table_rows_are_the_steps_own_factors(scaling):
    rope = RopeFactors(rotary(scaling), torch.float32, torch.device("cpu"))
    assert rope.static
    gen = torch.Generator().manual_seed(0)
    for size in (1, 5, 32):  # the table grows past several chunks on the way
        positions = torch.randint(0, 3 * CHUNK + 7, (size,), generator=gen).tolist()
        cos, sin, rows = rope.rows(positions)
        own_cos, own_sin = rope.of(torch.tensor(positions))
        assert torch.equal(cos[rows], own_cos) and torch.equal(sin[rows], own_sin)
    assert rope.rows([0])[0].shape[0] >= 3 * CHUNK + 7


def test_sin_carries_rotate_halfs_sign():
    emb = rotary(None)
    rope = RopeFactors(emb, torch.float32, torch.device("cpu"))
    positions = torch.tensor([0, 3, 100])
    x = torch.randn(3, 64)
    cos, sin = emb(x, positions[None])
    own_cos, own_sin = rope.of(positions)
    assert torch.equal(own_cos, cos[0])
    assert torch.equal(x * own_cos + x.roll(32, -1) * own_sin, x * cos[0] + rotate_half(x) * sin[0])


def test_a_length_dependent_rope_type_is_computed_per_step():
    emb = rotary({"rope_type": "dynamic", "factor": 2.0})
    rope = RopeFactors(emb, torch.float32, torch.device("cpu"))
    assert not rope.static
    cos, sin, rows = rope.rows([4000, 7])  # past the original length: rescaled
    assert rows == [0, 1] and cos.shape[0] == 2
    own_cos, own_sin = rope.of(torch.tensor([4000, 7]))
    assert torch.equal(cos, own_cos) and torch.equal(sin, own_sin)
