"""The paged KV cache: slot mapping, reservations, growth, and no leaked blocks."""

from __future__ import annotations

import pytest
import torch

from readmoe.errors import ReadmoeError
from readmoe.serve.kv_cache import PagedKVCache, kv_dtype_of


def cache(blocks: int = 6, size: int = 4) -> PagedKVCache:
    return PagedKVCache(num_layers=2, num_blocks=blocks, block_size=size, kv_heads=2, head_dim=3)


def test_pools_are_preallocated_per_layer():
    kv = cache()
    assert len(kv.keys) == len(kv.values) == 2
    assert tuple(kv.keys[0].shape) == (6 * 4 + 1, 2, 3)  # and the spare slot
    assert kv.spare_slot == 6 * 4


def test_slots_follow_the_block_table():
    kv = cache()
    kv.admit("a", 3)
    kv.admit("b", 10)
    kv.grow("a", 3)
    kv.grow("b", 6)
    kv.grow("a", 3)  # already covered: no new block
    assert kv.num_free == 3
    a, b = kv.table("a"), kv.table("b")
    assert kv.slots("a", 0, 3).tolist() == [a[0] * 4 + i for i in range(3)]
    assert kv.slots("b", 3, 3).tolist() == [b[0] * 4 + 3, b[1] * 4, b[1] * 4 + 1]


def naive_slots(kv: PagedKVCache, request_id: str, start: int, count: int) -> list[int]:
    table = kv.table(request_id)
    return [table[p // kv.block_size] * kv.block_size + p % kv.block_size
            for p in range(start, start + count)]


def test_reused_slots_follow_growth_and_a_new_table_under_the_same_id():
    kv = cache()
    kv.admit("x", 2)  # takes a block first, so "a" does not get the blocks it freed back
    kv.grow("x", 2)
    kv.admit("a", 12)
    for tokens in range(1, 13):
        kv.grow("a", tokens)
        assert kv.slots("a", 0, tokens).tolist() == naive_slots(kv, "a", 0, tokens)
    kv.free("a")
    kv.admit("b", 4)
    kv.grow("b", 4)
    kv.admit("a", 6)  # the same id, other blocks
    kv.grow("a", 6)
    assert kv.slots("a", 1, 5).tolist() == naive_slots(kv, "a", 1, 5)
    with pytest.raises(IndexError, match="outside its 2 blocks"):
        kv.slots("a", 6, 3)


def test_reservations_limit_admission_and_growth():
    kv = cache(blocks=4)
    assert kv.can_admit(16) and not kv.can_admit(17)
    kv.admit("a", 9)  # 3 blocks reserved, none taken yet
    assert kv.num_free == 4 and kv.num_available == 1
    assert not kv.can_admit(5)
    with pytest.raises(ReadmoeError):
        kv.admit("b", 5)
    kv.grow("a", 9)
    with pytest.raises(ReadmoeError, match="outgrew"):
        kv.grow("a", 13)
    with pytest.raises(ReadmoeError, match="already"):
        kv.admit("a", 1)


def test_write_lands_in_the_slots():
    kv = cache()
    kv.admit("a", 5)
    kv.grow("a", 5)
    slots = kv.slots("a", 0, 5)
    keys, values = torch.randn(5, 2, 3), torch.randn(5, 2, 3)
    kv.write(1, slots, keys, values)
    assert torch.equal(kv.keys[1][slots], keys) and torch.equal(kv.values[1][slots], values)


def test_free_restores_every_block():
    kv = cache()
    for i, tokens in enumerate([5, 9, 2]):
        kv.admit(f"r{i}", tokens)
        kv.grow(f"r{i}", tokens - 1)
    for i in range(3):
        kv.free(f"r{i}")
        assert not kv.holds(f"r{i}")
    kv.free("never-admitted")
    assert kv.num_free == kv.num_available == kv.num_blocks


def test_a_float16_cache_rounds_what_it_stores_and_names_its_choices():
    kv = PagedKVCache(num_layers=1, num_blocks=2, block_size=4, kv_heads=1, head_dim=3,
                      dtype=kv_dtype_of("float16", torch.float32))
    keys = torch.tensor([[[1 / 3, 1e-5, 70000.0]]])
    kv.write(0, torch.tensor([5]), keys, -keys)
    assert torch.equal(kv.keys[0][5], keys[0].half()) and kv.values[0].dtype == torch.float16
    assert kv_dtype_of("auto", torch.bfloat16) == torch.bfloat16
    with pytest.raises(ReadmoeError, match="--kv-dtype 'fp8': choose one of auto, float16"):
        kv_dtype_of("fp8", torch.float32)
