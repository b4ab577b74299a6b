"""The bf16 panel products (csrc/gemm_bf16.cpp, gemm_bf16_avx2.cpp, ``--quantize bf16``): the
layout, x @ W.T (+ bias) (+ add) equal to a float64 reference of the bf16-rounded operands for
every row, column and K remainder (odd K too), through AMX, VDPBF16PS or AVX2, a row's result
the same bits in any batch and on any thread count, packed matrices using them for every row
count, and a bf16 runner against the float32 one."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from readmoe.errors import ReadmoeError
from readmoe.models.device import resolve_placement
from readmoe.serve import cpu_ops
from readmoe.serve.kv_cache import PagedKVCache
from readmoe.serve.launch import EngineOptions, open_engine
from readmoe.serve.packed import BLOCKED_MAX_ROWS, PANEL_COLUMNS, PackedMatrix, to_bf16_panels
from readmoe.serve.quantized import check_quantization
from readmoe.serve.runner import ModelRunner, RunnerChunk
from readmoe.serve.sampling import SamplingParams
from tests.serve.test_engine import compensated, prefilled_step
from tests.serve.test_panels import ROWS, SHAPES, check_products, on_threads
from tests.server.helpers import save_tiny_model

OPS = cpu_ops.load()
pytestmark = pytest.mark.skipif(not cpu_ops.bf16_applies(OPS),
                                reason="the bf16 panel products need the fused ops and "
                                "AVX512-BF16, or AVX2 and FMA")


def reference(x, weight, bias=None, add=None):
    """float64 products of the operands as the kernel sees them: rounded to bf16."""
    want = x.bfloat16().double() @ weight.bfloat16().double().t()
    if bias is not None:
        want = want + bias.double()
    return want if add is None else want + add.double()


CLOSE = {"rtol": 1e-5, "atol": 1e-4}  # float32 sums of bf16 products


def test_bf16_panels_hold_column_pairs_in_order_zero_padded():
    weight = torch.randn(50, 7)
    panels = to_bf16_panels(weight)
    assert panels.shape == (2, 16, PANEL_COLUMNS, 2) and panels.dtype == torch.bfloat16
    rounded = weight.bfloat16()
    assert torch.equal(panels[0, 1, :, 0], rounded[:48, 2])
    assert torch.equal(panels[0, 1, :, 1], rounded[:48, 3])
    assert torch.equal(panels[1, 3, :2, 0], rounded[48:, 6])
    assert panels[1, 3, :, 1].abs().sum() == 0 and panels[1, :, 2:].abs().sum() == 0
    assert panels[:, 4:].abs().sum() == 0  # k pairs padded to a tile's 16


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize(("columns", "width"), SHAPES)
def test_bf16_panel_products_equal_the_reference(rows, columns, width):
    check_products(to_bf16_panels, reference, CLOSE, rows, columns, width)


def test_a_rows_bf16_result_is_the_same_bits_in_any_batch_and_thread_count():
    """Two rows or more: the same bits in any batch (AMX where it runs, else VDPBF16PS); one
    row (VDPBF16PS) equal to rounding."""
    gen = torch.Generator().manual_seed(4)
    weight, x = torch.randn(200, 96, generator=gen), torch.randn(37, 96, generator=gen)
    panels = to_bf16_panels(weight)
    batch = OPS.panel_linear(x, panels, 200, None, None, None)
    for rows in (slice(5, 13), slice(30, 32), slice(0, 17)):
        assert torch.equal(OPS.panel_linear(x[rows], panels, 200, None, None, None), batch[rows])
    for row in (0, 8, 31, 36):
        torch.testing.assert_close(OPS.panel_linear(x[row:row + 1], panels, 200, None, None,
                                                    None)[0], batch[row], rtol=1e-5, atol=1e-5)
    assert all(torch.equal(y, batch) for y in on_threads(
        lambda: OPS.panel_linear(x, panels, 200, None, None, None)))


@pytest.mark.parametrize("columns", [100, 401])
def test_on_avx2_a_rows_result_is_the_same_bits_alone_and_in_a_batch(columns):
    """The AVX2 kernel sums each output in VDPBF16PS's order whatever the rows around it:
    one row alone (four panels side by side: 3 panels, or 9 as 4, 4 and 1) equals its row of
    a batch (pairs of rows, two passes of 24), and each equals the reference summed in that
    order in float32, then + bias, + add. K = 301 is 151 k pairs: two chunks of 64 and a
    part one, the batch's sums parked between them."""
    if OPS.avx512_bf16_panels():
        pytest.skip("this CPU multiplies bf16 panels by AVX512-BF16, not AVX2")
    gen = torch.Generator().manual_seed(6)
    width = 301
    weight, x = torch.randn(columns, width, generator=gen), torch.randn(5, width, generator=gen)
    bias, add = torch.randn(columns, generator=gen), torch.randn(5, columns, generator=gen)
    panels = to_bf16_panels(weight)
    batch = OPS.panel_linear(x, panels, columns, bias, add, None)
    for row in range(5):
        alone = OPS.panel_linear(x[row:row + 1], panels, columns, bias, add[row:row + 1], None)
        assert torch.equal(alone[0], batch[row])
    w, a = weight.bfloat16().float(), x.bfloat16().float()
    want = torch.zeros(5, columns)
    for k in range(0, width + 1, 2):  # odd k first, then even, each added once (k = 301: pad)
        if k + 1 < width:
            want = torch.addcmul(want, a[:, k + 1:k + 2], w[:, k + 1][None])
        want = torch.addcmul(want, a[:, k:k + 1], w[:, k][None])
    torch.testing.assert_close(batch, (want + bias) + add, rtol=0, atol=0)


def test_without_amx_many_rows_go_through_vdpbf16ps_alike():
    """READMOE_AMX=0 (read once a process): the other kernel, the same reference, each row the
    same bits alone or in a batch."""
    script = (
        "import torch\n"
        "from readmoe.serve import cpu_ops\n"
        "from readmoe.serve.packed import to_bf16_panels\n"
        "ops = cpu_ops.load()\n"
        "gen = torch.Generator().manual_seed(5)\n"
        "w, x, b = (torch.randn(*s, generator=gen) for s in ((130, 33), (40, 33), (130,)))\n"
        "y = ops.panel_linear(x, to_bf16_panels(w), 130, b, None, None).double()\n"
        "want = x.bfloat16().double() @ w.bfloat16().double().t() + b.double()\n"
        "assert (y - want).abs().max() < 1e-4, (y - want).abs().max()\n"
        "alone = ops.panel_linear(x[7:8], to_bf16_panels(w), 130, b, None, None).double()\n"
        "assert torch.equal(alone[0], y[7])\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "READMOE_AMX": "0"}, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_bf16_panels_of_the_wrong_shape_are_refused():
    with pytest.raises(RuntimeError, match=r"bf16 panels must be contiguous \[P, 32, 48, 2\]"):
        OPS.panel_linear(torch.randn(2, 40), to_bf16_panels(torch.randn(50, 8)), 50, None,
                         None, None)


def test_packed_bf16_matrices_multiply_every_row_count_through_the_panels():
    weights = [torch.randn(40, 24), torch.randn(16, 24)]
    bias = (torch.randn(40), torch.randn(16))
    matrix = PackedMatrix.of(*weights, biases=bias, prepack=True, panels=True, bf16=True)
    assert matrix.blocked.dtype == torch.bfloat16 and matrix.weight.dtype == torch.float32
    assert matrix.weight.is_meta and matrix.weight.shape == (24, 56)  # no float32 copy kept
    assert matrix.nbytes == matrix.blocked.nbytes + 56 * 4
    fused, joined = torch.cat(weights), torch.cat(bias)
    for rows in (1, 2, BLOCKED_MAX_ROWS, 100):
        for prepacked in (True, False):  # a prefill step's products too: one precision
            x = torch.randn(rows, 24)
            torch.testing.assert_close(matrix(x, prepacked=prepacked).double(),
                                       reference(x, fused, joined), **CLOSE)


@torch.no_grad()
def test_a_bf16_runner_is_the_float32_one_to_bf16_rounding_alone_or_in_one_region():
    model = compensated(True)
    config = model.config
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, 128, (n,), generator=gen).tolist() for n in (12, 17, 9)]
    experts = [model.route(torch.tensor([s]))[0][0].tolist() for s in seqs]
    routed = [ids[-1] for ids in experts]
    logits = {}
    for quantize in ("none", "bf16"):
        kv = PagedKVCache(config.num_hidden_layers, 20, 4, config.num_key_value_heads,
                          config.hidden_size // config.num_attention_heads)
        runner = ModelRunner(model, kv, quantize=quantize)
        step = prefilled_step(runner, seqs, experts)
        logits[quantize] = runner.forward(step, routed)
        if quantize == "bf16":
            assert runner.packed[0].qkv.blocked.dtype == torch.bfloat16
            assert runner.decoder.team_runs(len(step))  # the one-region step takes bf16 too
            runner.decoder.team = False  # the per-layer calls: the same kernels, the same bits
            assert torch.equal(runner.forward(step, routed), logits["bf16"])
            torch.testing.assert_close(runner.forward(step[:1], routed[:1]),  # one row
                                       logits["bf16"][:1], rtol=1e-5, atol=1e-5)
    gap = (logits["bf16"] - logits["none"]).abs().max()
    assert 0 < gap < 0.02 * logits["none"].abs().max()


@torch.no_grad()
def test_a_bf16_runner_prefills_in_bf16_as_it_decodes():
    """A served perplexity is the decode's: the prefill logits of a sequence's last token
    equal its decode step's, every matrix (the experts' too) in bf16 panels both times."""
    model = compensated(True)
    config = model.config
    seq = torch.randint(3, 128, (14,), generator=torch.Generator().manual_seed(1)).tolist()
    experts = model.route(torch.tensor([seq]))[0][0].tolist()
    logits = {}
    for quantize in ("none", "bf16"):
        kv = PagedKVCache(config.num_hidden_layers, 20, 4, config.num_key_value_heads,
                          config.hidden_size // config.num_attention_heads)
        runner = ModelRunner(model, kv, quantize=quantize)
        step = prefilled_step(runner, [seq], [experts])
        decoded = runner.forward(step, experts[-1:])[0]
        kv.admit("whole", len(seq))
        kv.grow("whole", len(seq))
        chunk = RunnerChunk(seq, 0, kv.slots("whole", 0, len(seq)), True)
        logits[quantize] = runner.forward([chunk], experts, every_token=True)[-1]
        torch.testing.assert_close(logits[quantize], decoded, rtol=1e-5, atol=2e-5)
    assert (logits["bf16"] - logits["none"]).abs().max() > 1e-3  # bf16 it was


def test_bf16_is_refused_off_the_cpu_path_with_the_fix():
    with pytest.raises(ReadmoeError, match="load it on the CPU with --dtype float32"):
        check_quantization("bf16", torch.device("cpu"), torch.bfloat16)
    check_quantization("bf16", torch.device("cpu"), torch.float32)


def test_bf16_serves_beside_an_expert_store_and_a_float16_kv_cache(tmp_path):
    """The runner's own matrices in bf16, and the offloaded experts too (the store's slots
    hold bf16 panels: ``tests/serve/test_bf16_slots.py``)."""
    folder = save_tiny_model(tmp_path / "tiny")
    options = EngineOptions(quantize="bf16", capacity=1, tier="ram", kv_dtype="float16")
    with open_engine(str(folder), options, resolve_placement("cpu", "float32")) as served:
        runner = served.engine.runner
        assert runner.packed[0].qkv.blocked.dtype == torch.bfloat16
        assert runner.packed[0].experts is None and served.engine.store.form.bf16
        outs = served.engine.generate([[5, 9, 14, 3, 70], list(range(20, 60))],
                                      SamplingParams(max_tokens=6))
    assert all(o.finished and len(o.token_ids) == 6 for o in outs)
