"""The fused CPU ops against naive float64 references (RoPE and the KV write bit-exact against
the runner's torch ops), their refusals of bad input, and the loader's switch and fallback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from readmoe.model.pregating import sticky_argmax
from readmoe.serve import cpu_ops

pytestmark = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                reason="no C++ compiler: the runner keeps its torch ops")


@pytest.fixture(scope="module")
def ops():
    built = cpu_ops.load()
    assert built is not None, "the fused CPU ops did not build on a machine with a compiler"
    return built


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("rows", [1, 3, 40])
def test_rms_norm_matches_the_definition(ops, rows):
    x = torch.randn(rows, 75, generator=gen(rows)) * 3
    w = torch.randn(75, generator=gen(1))
    naive = x.double() / (x.double().pow(2).mean(-1, keepdim=True) + 1e-5).sqrt() * w.double()
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-5).double(), naive, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("width", [1, 7, 8, 40, 1536])
def test_silu_mul_matches_the_definition(ops, width):
    gate_up = torch.randn(5, 2 * width, generator=gen(width)) * 8
    gate_up[0, 0], gate_up[1, 0] = -100.0, 100.0  # where exp is clamped
    gate, up = gate_up.double().chunk(2, dim=-1)
    naive = gate / (1 + torch.exp(-gate)) * up
    torch.testing.assert_close(ops.silu_mul(gate_up).double(), naive, rtol=1e-6, atol=1e-6)


def naive_attention(q, keys, values, slots, lengths, scale):
    batch, heads, dim = q.shape
    group = heads // keys.shape[1]
    out = torch.empty(batch, heads, dim, dtype=torch.float64)
    for b in range(batch):
        used = slots[b, :lengths[b]]
        for h in range(heads):
            k = keys[used, h // group].double()  # [L, D]
            v = values[used, h // group].double()
            p = torch.softmax(k @ q[b, h].double() * scale, dim=0)
            out[b, h] = p @ v
    return out.reshape(batch, heads * dim)


def naive_first_max(row: list[float]) -> int:
    """The index torch.max(-1) gives: the first NaN if any, else the first maximum."""
    for i, value in enumerate(row):
        if value != value:
            return i
    return row.index(max(row))


@pytest.mark.parametrize("width", [1, 7, 31, 32, 33, 100, 49152])
def test_argmax_rows_finds_the_first_maximum(ops, width):
    x = torch.randn(5, width, generator=gen(width))
    x[1] = x[1].round()  # many ties: the first must win
    x[2, width // 2:] = float("inf")
    x[3] = float("-inf")
    x[4, (2 * width) // 3] = float("nan")
    got = ops.argmax_rows(x).tolist()
    assert got == [naive_first_max(row) for row in x.tolist()]
    assert got == x.max(-1).indices.tolist()


@pytest.mark.parametrize("margin", [0.0, 0.1, 0.7, 2.5])
def test_sticky_rows_equals_the_routers_hysteresis(ops, margin):
    """pregating.sticky_argmax for one token a row, to the bit at its boundary: the held
    expert's logit exactly at, just above and just below top - margin (float32)."""
    logits = torch.randn(240, 8, generator=gen(1))
    logits[:40] = logits[:40].round()  # ties: the first maximum is the best
    previous = torch.randint(-1, 8, (240,), generator=gen(2))
    for row in range(40, 220):
        held = int(previous[row].clamp_min(0))
        previous[row] = held
        top = logits[row].max()
        cut = top - margin  # as sticky_argmax computes it: float32 minus a Python float
        shift = (row % 3) - 1  # -1, 0, +1: one float32 step below, at, above the cut
        edge = cut if shift == 0 else torch.nextafter(cut, cut + shift)
        logits[row, held] = torch.minimum(edge, top)
    logits[230, 5] = float("nan")
    logits[231, 0] = float("nan")
    expected = sticky_argmax(logits[:, None], margin, previous)[:, 0].tolist()
    assert ops.sticky_rows(logits, margin, previous.tolist()).tolist() == expected
    kept = sum(e == p for e, p in zip(expected[40:220], previous[40:220].tolist(), strict=True))
    assert margin == 0 or 0 < kept < 180  # the boundary rows go both ways


def test_the_decoder_without_layers_is_embedding_and_final_norm_in_row_order(ops):
    """Rows sorted by expert on the way in come back in their own order; the embedding is
    a lookup and the final norm the fused one."""
    embed, norm = torch.randn(50, 16, generator=gen(3)), torch.rand(16, generator=gen(4))
    decoder = ops.Decoder(2, 1, 0.5, embed, norm, 1e-5)
    tokens, experts = [7, 3, 49, 3, 0], [2, 0, 1, 0, 2]
    contexts = [torch.arange(n + 1) for n in range(5)]
    cos = sin = torch.ones(6, 8)
    out = decoder.step(tokens, contexts, cos, sin, [0, 1, 2, 3, 4], experts)
    assert torch.equal(out, ops.rms_norm(embed[tokens], norm, 1e-5))
    with pytest.raises(RuntimeError, match="a context holds at least its query's slot"):
        decoder.step([1], [torch.arange(0)], cos, sin, [0], [])
    with pytest.raises(RuntimeError, match="1-D int64 CPU tensor"):
        decoder.step([1], [torch.arange(3.0)], cos, sin, [0], [])
    with pytest.raises(RuntimeError, match="one routed expert per token"):
        decoder.step([1, 2], contexts[:2], cos, sin, [0, 1], [0])
    with pytest.raises(RuntimeError, match="is not an expert"):
        decoder.step([1], contexts[:1], cos, sin, [0], [-1])


@pytest.mark.parametrize(("heads", "kv_heads", "dim"),
                         [(4, 4, 8), (9, 3, 64), (6, 2, 20), (8, 2, 128), (4, 2, 64),
                          (10, 2, 64), (7, 1, 128)])
def test_decode_attention_reads_the_pool_in_place(ops, heads, kv_heads, dim):
    pool, batch, width = 50, 5, 11
    keys = torch.randn(pool, kv_heads, dim, generator=gen(0)) * 2
    values = torch.randn(pool, kv_heads, dim, generator=gen(1))
    q = torch.randn(batch, heads, dim, generator=gen(2))
    lengths = torch.tensor([1, 11, 4, 7, 2])
    slots = torch.stack([torch.randperm(pool, generator=gen(3 + b))[:width]
                         for b in range(batch)])
    for b in range(batch):  # past a request's length: never read (out of the pool on purpose)
        slots[b, lengths[b]:] = 10**9
    got = ops.decode_attention(q, keys, values, slots, lengths, dim ** -0.5)
    torch.testing.assert_close(got.double(), naive_attention(q, keys, values, slots, lengths,
                                                             dim ** -0.5), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("heads", "kv_heads", "dim"),
                         [(9, 3, 64), (8, 2, 128), (6, 2, 64), (10, 2, 64), (6, 3, 20)])
def test_grouped_query_heads_equal_each_head_alone_to_the_bit(ops, heads, kv_heads, dim):
    """The register kernels run up to three query heads of a GQA group over each key and value
    row at once; every head's sums keep a single head's order, so each head's output is the
    bits of that head run alone over its kv head (lengths cross the four-key steps)."""
    pool, batch, width = 80, 4, 41
    keys = torch.randn(pool, kv_heads, dim, generator=gen(0)) * 2
    values = torch.randn(pool, kv_heads, dim, generator=gen(1))
    q = torch.randn(batch, heads, dim, generator=gen(2))
    lengths = torch.tensor([41, 1, 7, 30])
    slots = torch.stack([torch.randperm(pool, generator=gen(3 + b))[:width]
                         for b in range(batch)])
    grouped = ops.decode_attention(q, keys, values, slots, lengths, dim ** -0.5)
    group = heads // kv_heads
    for h in range(heads):
        alone = ops.decode_attention(q[:, h:h + 1].contiguous(),
                                     keys[:, h // group:h // group + 1].contiguous(),
                                     values[:, h // group:h // group + 1].contiguous(),
                                     slots, lengths, dim ** -0.5)
        assert torch.equal(grouped[:, h * dim:(h + 1) * dim], alone), f"head {h}"


@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(9, 3, 64), (6, 2, 20), (7, 1, 128)])
def test_float16_pools_are_read_as_their_exact_float32_values(ops, heads, kv_heads, dim):
    """A float16 KV pool widens exactly: attention over it is, to the bit, attention over a
    float32 pool holding the same values (the register kernels and the generic loops)."""
    pool, batch, width = 60, 4, 13
    keys = (torch.randn(pool, kv_heads, dim, generator=gen(0)) * 3).half()
    values = torch.randn(pool, kv_heads, dim, generator=gen(1)).half()
    q = torch.randn(batch, heads, dim, generator=gen(2))
    lengths = torch.tensor([1, 13, 5, 9])
    slots = torch.stack([torch.randperm(pool, generator=gen(3 + b))[:width]
                         for b in range(batch)])
    half = ops.decode_attention(q, keys, values, slots, lengths, dim ** -0.5)
    wide = ops.decode_attention(q, keys.float(), values.float(), slots, lengths, dim ** -0.5)
    assert torch.equal(half, wide)
    torch.testing.assert_close(half.double(), naive_attention(
        q, keys.float(), values.float(), slots, lengths, dim ** -0.5), rtol=1e-5, atol=1e-6)


def test_rope_write_kv_rounds_into_float16_pools_as_to_does(ops):
    rows, heads, kv_heads, dim, pool = 5, 4, 2, 64, 30
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * dim, generator=gen(0)) * 100
    cos, sin = torch.randn(rows, dim, generator=gen(1)), torch.randn(rows, dim, generator=gen(2))
    slots = torch.tensor([3, 17, 0, 29, 8])
    wide = [torch.zeros(pool, kv_heads, dim) for _ in range(2)]
    narrow = [torch.zeros(pool, kv_heads, dim, dtype=torch.float16) for _ in range(2)]
    q_wide = ops.rope_write_kv(qkv, cos, sin, *wide, slots, heads, kv_heads)
    q_narrow = ops.rope_write_kv(qkv, cos, sin, *narrow, slots, heads, kv_heads)
    assert torch.equal(q_wide, q_narrow)
    for full, rounded in zip(wide, narrow, strict=True):
        assert torch.equal(full.half(), rounded)
    assert not torch.equal(narrow[0].float(), wide[0])  # rounded for real
    with pytest.raises(RuntimeError, match="must have one dtype"):
        ops.rope_write_kv(qkv, cos, sin, wide[0], narrow[1], slots, heads, kv_heads)
    with pytest.raises(RuntimeError, match="float32 or float16"):
        ops.decode_attention(torch.ones(1, 4, dim), *(t.double() for t in wide),
                             torch.tensor([[0]]), torch.tensor([1]), 0.1)


def test_rope_write_kv_equals_the_torch_ops_bit_for_bit(ops):
    rows, heads, kv_heads, dim, pool = 6, 9, 3, 64, 40
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * dim, generator=gen(0))
    cos = torch.randn(rows, dim, generator=gen(1))
    sin = torch.randn(rows, dim, generator=gen(2))
    slots = torch.tensor([3, 17, 0, 39, 8, 21])
    keys, values = torch.zeros(pool, kv_heads, dim), torch.zeros(pool, kv_heads, dim)
    want_keys, want_values = keys.clone(), values.clone()
    qk, v = qkv.split([(heads + kv_heads) * dim, kv_heads * dim], dim=-1)
    qk = qk.view(rows, heads + kv_heads, dim)
    qk = qk * cos[:, None] + qk.roll(dim // 2, -1) * sin[:, None]
    want_q, k = qk.split([heads, kv_heads], dim=1)
    want_keys.index_copy_(0, slots, k)
    want_values.index_copy_(0, slots, v.reshape(rows, kv_heads, dim))
    q = ops.rope_write_kv(qkv, cos, sin, keys, values, slots, heads, kv_heads)
    assert torch.equal(q, want_q)
    assert torch.equal(keys, want_keys) and torch.equal(values, want_values)


def test_bad_input_is_refused_with_the_reason(ops):
    with pytest.raises(RuntimeError, match="must be float32"):
        ops.rms_norm(torch.ones(2, 4, dtype=torch.float64), torch.ones(4, dtype=torch.float64),
                     1e-5)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        ops.silu_mul(torch.ones(4, 6).t())
    keys = torch.zeros(8, 1, 4)
    with pytest.raises(RuntimeError, match="outside the pool"):
        ops.decode_attention(torch.ones(1, 2, 4), keys, keys, torch.tensor([[9]]),
                             torch.tensor([1]), 0.5)
    with pytest.raises(RuntimeError, match="outside the pool"):
        ops.rope_write_kv(torch.ones(1, 16), torch.ones(1, 4), torch.ones(1, 4), keys,
                          keys.clone(), torch.tensor([8]), 2, 1)
    with pytest.raises(RuntimeError, match="must not be empty"):
        ops.argmax_rows(torch.ones(2, 0))
    with pytest.raises(RuntimeError, match="previous expert 8 outside the 8 experts"):
        ops.sticky_rows(torch.ones(1, 8), 0.5, [8])
    with pytest.raises(RuntimeError, match="one previous expert per row"):
        ops.sticky_rows(torch.ones(2, 8), 0.5, [0])


def test_the_switch_turns_them_off(monkeypatch):
    monkeypatch.setenv(cpu_ops.DISABLE, "0")
    cpu_ops.load.cache_clear()
    try:
        assert cpu_ops.load() is None
    finally:
        monkeypatch.delenv(cpu_ops.DISABLE)
        cpu_ops.load.cache_clear()
    assert cpu_ops.ops_for(torch.device("cpu"), torch.bfloat16) is None


def test_a_failed_build_warns_and_leaves_the_torch_ops(tmp_path):
    """In a process of its own: torch keeps one extension of a name per process."""
    (tmp_path / "kernels.cpp").write_text("this is not C++\n")
    (tmp_path / "layer.cpp").write_text("")
    code = ("import pathlib, warnings\n"
            "from readmoe.serve import cpu_ops\n"
            f"cpu_ops.CSRC = pathlib.Path({str(tmp_path)!r})\n"
            "with warnings.catch_warnings(record=True) as caught:\n"
            "    warnings.simplefilter('always')\n"
            "    assert cpu_ops.load() is None\n"
            "assert any('could not be built' in str(w.message) for w in caught)\n")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_threads_split_rows_without_changing_a_bit(ops):
    rows, width, heads, kv_heads, dim, pool = 64, 1536, 4, 2, 16, 300
    x = torch.randn(rows, 2 * width, generator=gen(0))
    w = torch.randn(2 * width, generator=gen(1))
    q = torch.randn(rows, heads, dim, generator=gen(2))
    keys = torch.randn(pool, kv_heads, dim, generator=gen(3))
    slots = torch.randint(0, pool, (rows, 9), generator=gen(4))
    lengths = torch.randint(1, 10, (rows,), generator=gen(5))
    before = torch.get_num_threads()

    def run():
        return (ops.silu_mul(x), ops.rms_norm(x, w, 1e-6),
                ops.decode_attention(q, keys, keys, slots, lengths, 0.25))

    try:
        torch.set_num_threads(1)
        single = run()
        torch.set_num_threads(2)
        for got, want in zip(run(), single, strict=True):
            assert torch.equal(got, want)
    finally:
        torch.set_num_threads(before)


def test_a_long_call_lets_other_python_threads_run(ops):
    """The ops release the GIL as torch's do: a Python thread (the expert store's copy
    worker, a server's front end) keeps running through a long decode call. Holding the GIL
    would freeze it for the whole call: a gap in its timestamps as long as the call."""
    batch, heads, dim, length, pool = 32, 8, 128, 6144, 4096
    q = torch.randn(batch, heads, dim, generator=gen(0))
    keys = torch.randn(pool, heads, dim, generator=gen(1))
    slots = torch.randint(0, pool, (batch, length), generator=gen(2))
    lengths = torch.full((batch,), length)
    stamps: list[float] = []
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            stamps.append(time.perf_counter())

    worker = threading.Thread(target=spin)
    worker.start()
    try:
        time.sleep(0.02)
        begin = time.perf_counter()
        ops.decode_attention(q, keys, keys, slots, lengths, 0.1)
        end = time.perf_counter()
        time.sleep(0.02)
    finally:
        stop.set()
        worker.join()
    assert end - begin > 0.06, "the call is too short to tell"
    around = [s for s in stamps if begin - 0.01 < s < end + 0.01]
    longest = max(b - a for a, b in zip(around, around[1:], strict=False))
    assert longest < (end - begin) / 2, f"the thread stood still {longest:.3f} s of the call"


@pytest.mark.parametrize("streams", [1, 2, 4, 8, 16])
def test_read_streams_reads_every_word_of_its_whole_blocks_once(ops, streams):
    """The read-bandwidth probe: its xor equals the xor of each word it is meant to read (the
    tensor's whole blocks of 16 runs of 256 KB, on 1 and 2 threads), so no read is skipped
    or doubled; a part block at the end is left out."""
    words = torch.randint(-2**31, 2**31 - 1, (4 * 16 * 65536 + 123,), dtype=torch.int64,
                          generator=gen(streams)).to(torch.int32)
    block = streams * 65536  # 32-bit words in a block: `streams` runs of 4096 lines
    read = words[:words.numel() // block * block].numpy().view("uint32")
    want = int(np.bitwise_xor.reduce(read))
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            assert ops.read_streams(words, streams) == want
    finally:
        torch.set_num_threads(threads)


def test_read_streams_refuses_what_it_cannot_read(ops):
    with pytest.raises(RuntimeError, match="streams must be"):
        ops.read_streams(torch.zeros(1024), 3)
    with pytest.raises(RuntimeError, match="contiguous CPU tensor"):
        ops.read_streams(torch.zeros(64, 64).t(), 1)
