"""The fused ops' panel products (csrc/gemm.cpp, gemm_avx2.cpp): x @ W.T (+ bias) (+ add)
equal to a float64 reference for every row, column and K remainder, and bit for bit to one
FMA chain in k order; a row's result the same bits alone, in any batch and on any thread
count; and the packed matrices use them for 2-48 rows only (one row too where the AVX2 kernel
runs)."""

from __future__ import annotations

import pytest
import torch

from readmoe.serve import cpu_ops
from readmoe.serve.packed import (
    BLOCKED_MAX_ROWS,
    BLOCKED_MIN_ROWS,
    PANEL_COLUMNS,
    PackedMatrix,
    to_panels,
)

OPS = cpu_ops.load()
pytestmark = pytest.mark.skipif(OPS is None or not OPS.panels_supported(),
                                reason="the panel products need the fused ops and AVX2 or AVX-512")


def reference(x, weight, bias=None, add=None):
    want = x.double() @ weight.double().t()
    if bias is not None:
        want = want + bias.double()
    return want if add is None else want + add.double()


def test_panels_hold_the_columns_in_order_zero_padded():
    weight = torch.randn(50, 7)
    panels = to_panels(weight)
    assert panels.shape == (2, 7, PANEL_COLUMNS) and panels.is_contiguous()
    assert torch.equal(panels[0], weight[:48].t())
    assert torch.equal(panels[1, :, :2], weight[48:].t())
    assert panels[1, :, 2:].abs().sum() == 0
    assert OPS.PANEL_COLUMNS == PANEL_COLUMNS


ROWS = [1, 2, 7, 8, 9, 16, 33, 48]
SHAPES = [(1, 5), (47, 64), (48, 1), (49, 33), (130, 64)]  # (columns, width)


def check_products(pack, want, close: dict, rows: int, columns: int, width: int) -> None:
    """``OPS.panel_linear`` through ``pack(weight)`` against ``want(x, weight, bias, add)``:
    plain, with bias and a residual, and into a caller's rows with the residual added in
    place (the MoE FFN's routed experts), the rows around them untouched."""
    gen = torch.Generator().manual_seed(rows * 1000 + columns)
    weight = torch.randn(columns, width, generator=gen)
    bias = torch.randn(columns, generator=gen)
    x = torch.randn(rows, width, generator=gen)
    add = torch.randn(rows, columns, generator=gen)
    panels = pack(weight)
    torch.testing.assert_close(OPS.panel_linear(x, panels, columns, None, None, None).double(),
                               want(x, weight), **close)
    torch.testing.assert_close(OPS.panel_linear(x, panels, columns, bias, add, None).double(),
                               want(x, weight, bias, add), **close)
    target = torch.randn(rows + 2, columns, generator=gen)
    before = target.clone()
    rows_view = target[1:rows + 1]
    OPS.panel_linear(x, panels, columns, None, rows_view, rows_view)
    torch.testing.assert_close(target[1:rows + 1].double(),
                               want(x, weight, add=before[1:rows + 1]), **close)
    assert torch.equal(target[0], before[0]) and torch.equal(target[-1], before[-1])


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize(("columns", "width"), SHAPES)
def test_panel_products_equal_the_reference(rows, columns, width):
    check_products(to_panels, reference, {"rtol": 1e-5, "atol": 1e-5}, rows, columns, width)


def test_strided_inputs_and_outputs():
    gen = torch.Generator().manual_seed(3)
    weight, wide = torch.randn(60, 32, generator=gen), torch.randn(5, 70, generator=gen)
    x = wide[:, :32]  # a column slice: strided rows, as the floor's gate|up halves are
    add = torch.randn(60, 5, generator=gen).t()
    out = torch.zeros(5, 80)[:, 10:70]
    OPS.panel_linear(x, to_panels(weight), 60, None, add, out)
    torch.testing.assert_close(out.double(), reference(x, weight, add=add), rtol=1e-5,
                               atol=1e-5)


def test_a_rows_result_is_the_same_bits_alone_in_any_batch_and_thread_count():
    gen = torch.Generator().manual_seed(4)
    weight, x = torch.randn(200, 96, generator=gen), torch.randn(37, 96, generator=gen)
    panels = to_panels(weight)
    batch = OPS.panel_linear(x, panels, 200, None, None, None)
    for row in (0, 8, 31, 36):
        alone = OPS.panel_linear(x[row:row + 1], panels, 200, None, None, None)
        assert torch.equal(alone[0], batch[row])
    assert torch.equal(OPS.panel_linear(x[5:13], panels, 200, None, None, None), batch[5:13])
    assert all(torch.equal(y, batch) for y in on_threads(
        lambda: OPS.panel_linear(x, panels, 200, None, None, None)))


def fma_chain(x, weight, bias, add):
    """Each output as one float32 FMA chain over k = 0, 1, ... from zero, then + bias, + add,
    each rounded to float32: a product of two float32 values is exact in float64, and the
    float64 sum rounded to float32 is the FMA's (a double rounding could differ once in about
    2^29 steps; this seed's do not)."""
    acc = torch.zeros(x.shape[0], weight.shape[0], dtype=torch.float32)
    for k in range(x.shape[1]):
        step = acc.double() + x[:, k:k + 1].double() * weight[:, k].double()
        acc = step.float()
    return (acc + bias) + add


@pytest.mark.parametrize("rows", [1, 3, 4, 53])
def test_each_output_is_one_fma_chain_in_k_order_across_chunks(rows):
    """K of 150 runs the AVX2 kernel's chunks of 64 k steps twice and a part chunk, the sums
    parked between them; 53 rows take two groups of rows (48 and 5). Bits, not closeness."""
    gen = torch.Generator().manual_seed(rows)
    weight, bias = torch.randn(100, 150, generator=gen), torch.randn(100, generator=gen)
    x, add = torch.randn(rows, 150, generator=gen), torch.randn(rows, 100, generator=gen)
    got = OPS.panel_linear(x, to_panels(weight), 100, bias, add, None)
    assert torch.equal(got, fma_chain(x, weight, bias, add))


@pytest.mark.parametrize("rows", [1, 2, 3])
@pytest.mark.parametrize("columns", [20, 48, 150, 195, 380, 401])
def test_few_rows_read_panels_side_by_side_as_one_fma_chain_each(rows, columns):
    """1-3 rows read four panels at once (the AVX2 kernel's stream_rows): 1-9 panels, so
    groups of four and every remainder, the last panel part-filled or whole. Bits, not
    closeness, and the same bits as each row inside a batch of 8."""
    gen = torch.Generator().manual_seed(columns + rows)
    weight, bias = torch.randn(columns, 70, generator=gen), torch.randn(columns, generator=gen)
    x, add = torch.randn(8, 70, generator=gen), torch.randn(8, columns, generator=gen)
    panels = to_panels(weight)
    got = OPS.panel_linear(x[:rows], panels, columns, bias, add[:rows], None)
    assert torch.equal(got, fma_chain(x[:rows], weight, bias, add[:rows]))
    assert torch.equal(got, OPS.panel_linear(x, panels, columns, bias, add, None)[:rows])


def on_threads(call) -> list[torch.Tensor]:
    """``call()``'s result on 2 threads and on 1 (torch's thread count restored after)."""
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (2, 1):
            torch.set_num_threads(count)
            results.append(call())
        return results
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize(("call", "message"), [
    (lambda p: OPS.panel_linear(torch.randn(2, 9), p, 50, None, None, None), "panels must be"),
    (lambda p: OPS.panel_linear(torch.randn(2, 8), p, 97, None, None, None), "do not hold"),
    (lambda p: OPS.panel_linear(torch.randn(2, 8), p, 50, torch.randn(49), None, None), "bias"),
    (lambda p: OPS.panel_linear(torch.randn(2, 8), p, 50, None, torch.randn(3, 50), None),
     "add must be"),
    (lambda p: OPS.panel_linear(torch.randn(2, 8), p, 50, None, None, torch.empty(2, 49)),
     "out must be"),
    (lambda p: OPS.panel_linear(torch.randn(2, 8).double(), p, 50, None, None, None),
     "float32"),
])
def test_bad_shapes_are_refused_with_the_reason(call, message):
    with pytest.raises(RuntimeError, match=message):
        call(to_panels(torch.randn(50, 8)))


def test_packed_matrices_use_the_panels_for_decode_row_counts_only():
    weights = [torch.randn(40, 24), torch.randn(16, 24)]
    bias = (torch.randn(40), torch.randn(16))
    matrix = PackedMatrix.of(*weights, biases=bias, prepack=True, panels=True)
    assert matrix.blocked is not None and not matrix.blocked.is_mkldnn
    assert matrix.blocked.shape == (2, 24, PANEL_COLUMNS)

    def panel_calls(rows: int) -> int:
        x = torch.randn(rows, 24)
        with torch.profiler.profile() as prof:
            y = matrix(x)
        torch.testing.assert_close(y.double(), reference(x, torch.cat(weights), torch.cat(bias)),
                                   rtol=1e-5, atol=1e-5)
        return sum(e.count for e in prof.key_averages() if e.key == "readmoe::panel_linear")

    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            fewest = OPS.panel_min_rows()
            assert fewest == (BLOCKED_MIN_ROWS if OPS.avx512_panels() else 1)
            assert fewest == 1 or panel_calls(fewest - 1) == 0
            assert panel_calls(fewest) == 1
            assert panel_calls(BLOCKED_MAX_ROWS) == 1
            assert panel_calls(BLOCKED_MAX_ROWS + 1) == 0
    finally:
        torch.set_num_threads(threads)


def test_the_runner_packs_panels_where_they_apply(monkeypatch):
    assert cpu_ops.panels_apply(OPS) == (torch.backends.cpu.get_cpu_capability()
                                         in {"AVX2", "AVX512"})
    monkeypatch.setenv(cpu_ops.PANELS, "0")
    assert not cpu_ops.panels_apply(OPS)
    assert not cpu_ops.panels_apply(None)
