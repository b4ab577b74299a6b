"""The runner's packed products: oneDNN's prepacked copy gives the plain product for every row
count, bias and residual, and the fused C++ layer switches to it where packed.py does."""

from __future__ import annotations

import pytest
import torch

from readmoe.serve import cpu_ops
from readmoe.serve.packed import (
    BLOCKED_MAX_ROWS,
    BLOCKED_MIN_ROWS,
    PackedMatrix,
    prepack_applies,
)

needs_onednn = pytest.mark.skipif(not prepack_applies(torch.device("cpu"), torch.float32),
                                  reason="torch without oneDNN: nothing is prepacked")


@needs_onednn
@pytest.mark.parametrize("rows", [1, 2, 5, 33, 48, 49, 200])
@pytest.mark.parametrize("with_bias", [False, True])
def test_prepacked_products_equal_the_plain_ones(rows, with_bias):
    gen = torch.Generator().manual_seed(rows)
    weights = [torch.randn(24, 40, generator=gen), torch.randn(8, 40, generator=gen)]
    biases = (torch.randn(24, generator=gen), torch.randn(8, generator=gen)) if with_bias else ()
    matrix = PackedMatrix.of(*weights, biases=biases, prepack=True)
    assert matrix.blocked is not None
    x, add = torch.randn(rows, 40, generator=gen), torch.randn(rows, 32, generator=gen)
    want = x.double() @ torch.cat(weights).double().t()
    if with_bias:
        want = want + torch.cat(biases).double()
    torch.testing.assert_close(matrix(x).double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(matrix(x, add=add).double(), want + add.double(), rtol=1e-5,
                               atol=1e-5)
    target = torch.zeros(rows + 2, 32)
    matrix(x, add=add, out=target[1:rows + 1])
    assert target[0].abs().sum() == 0 and target[-1].abs().sum() == 0
    torch.testing.assert_close(target[1:rows + 1].double(), want + add.double(), rtol=1e-5,
                               atol=1e-5)


def test_prepack_only_where_onednn_multiplies():
    weight = torch.randn(8, 4)
    assert PackedMatrix.of(weight).blocked is None
    assert PackedMatrix.of(weight.double(), prepack=True).blocked is None


@needs_onednn
def test_the_fused_layer_switches_at_the_same_row_count():
    ops = cpu_ops.load()
    if ops is None:
        pytest.skip("no fused CPU ops here")
    assert ops.BLOCKED_MIN_ROWS == BLOCKED_MIN_ROWS
    assert ops.BLOCKED_MAX_ROWS == BLOCKED_MAX_ROWS


@needs_onednn
def test_only_decode_sized_products_go_through_onednn():
    """A prefill's row counts must not reach oneDNN: each one would be a primitive in its
    cache, evicting the decode step's."""
    matrix = PackedMatrix.of(torch.randn(16, 8), prepack=True)

    def onednn_calls(rows: int) -> int:
        with torch.profiler.profile() as prof:
            matrix(torch.randn(rows, 8))
        return sum(e.count for e in prof.key_averages() if e.key.startswith("mkldnn::"))

    assert onednn_calls(BLOCKED_MIN_ROWS - 1) == 0
    assert onednn_calls(BLOCKED_MIN_ROWS) == 1
    assert onednn_calls(BLOCKED_MAX_ROWS) == 1
    assert onednn_calls(BLOCKED_MAX_ROWS + 1) == 0
