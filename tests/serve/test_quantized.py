"""Int8 serving: the fbgemm product equals its naive integer arithmetic, and an int8 runner's
logits equal a runner whose every matrix does that arithmetic naively."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from readmoe.errors import ReadmoeError
from readmoe.serve import cpu_ops
from readmoe.serve.engine import Engine
from readmoe.serve.kv_cache import PagedKVCache
from readmoe.serve.launch import EngineOptions
from readmoe.serve.packed import PackedExpert, PackedMatrix
from readmoe.serve.quantized import (
    Int8Matrix,
    check_quantization,
    quantize_weight,
    reference_product,
)
from readmoe.serve.runner import ModelRunner, RunnerChunk
from readmoe.serve.sampling import SamplingParams
from readmoe.serve.types import Budget
from tests.conftest import char_tokenizer
from tests.serve.test_engine import VOCAB, readme


def test_quantize_weight_is_symmetric_per_channel():
    weight = torch.tensor([[0.5, -1.0, 0.25], [4.0, 2.0, -3.0]])
    q, scales = quantize_weight(weight)
    torch.testing.assert_close(scales, torch.tensor([1.0, 4.0]) / 127)
    assert q.dtype == torch.int8 and q[0, 1] == -127 and q[1, 0] == 127
    torch.testing.assert_close(q.float() * scales[:, None], weight, atol=4 / 254, rtol=0)


@pytest.mark.parametrize("rows", [1, 7, 33])
def test_int8_product_equals_the_naive_integer_arithmetic(rows):
    gen = torch.Generator().manual_seed(rows)
    weight, bias = torch.randn(40, 24, generator=gen), torch.randn(40, generator=gen)
    x, add = torch.randn(rows, 24, generator=gen) * 2, torch.randn(rows, 40, generator=gen)
    matrix = Int8Matrix.of(weight, biases=(bias,))
    reference = reference_product(x, weight, bias)
    torch.testing.assert_close(matrix(x), reference, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(matrix(x, add=add), reference + add, atol=1e-4, rtol=1e-5)
    out = torch.empty(rows + 2, 40)
    matrix(x, out=out[1:rows + 1])
    torch.testing.assert_close(out[1:rows + 1], reference, atol=1e-4, rtol=1e-5)
    assert matrix.nbytes == 40 * 24 + 40 * 4 + 40 * 4  # int8 weights, scales, bias
    # and it is a quantization, not the float product
    assert (matrix(x) - (x @ weight.t() + bias)).abs().max() > 1e-3


@dataclasses.dataclass(frozen=True)
class _Naive:
    """A packed fp32 matrix multiplied with ``reference_product`` instead."""

    matrix: PackedMatrix

    def __call__(self, x, add=None, out=None, prepacked=True):  # the Matrix interface
        y = reference_product(x, self.matrix.weight.t(), self.matrix.bias)
        y = y if add is None else y + add
        return y if out is None else out.copy_(y)


def _naive_runner(runner: ModelRunner) -> ModelRunner:
    def expert(e: PackedExpert | None) -> PackedExpert | None:
        return None if e is None else PackedExpert(_Naive(e.gate_up), _Naive(e.down))

    runner.packed = [dataclasses.replace(
        p, qkv=_Naive(p.qkv), o=_Naive(p.o), shared=expert(p.shared),
        experts=None if p.experts is None else tuple(expert(e) for e in p.experts))
        for p in runner.packed]
    runner.lm_head = _Naive(runner.lm_head)
    runner.fused = [False] * len(runner.packed)  # layers of naive products run in Python
    return runner


@torch.no_grad()
def test_int8_runner_equals_a_runner_doing_the_arithmetic_naively():
    model = readme()
    config = model.config
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, VOCAB, (n,), generator=gen) for n in (11, 6)]
    experts = [model.route(s[None])[0][0] for s in seqs]
    logits = []
    for runner_of in (lambda kv: ModelRunner(model, kv, quantize="int8"),
                      lambda kv: _naive_runner(ModelRunner(model, kv)),
                      lambda kv: ModelRunner(model, kv)):
        kv = PagedKVCache(config.num_hidden_layers, 12, 4, config.num_key_value_heads,
                          config.hidden_size // config.num_attention_heads)
        runner = runner_of(kv)
        steps = []
        for plan in ([(0, 0, 10), (1, 0, 5)], [(0, 10, 11), (1, 5, 6)]):  # prefill, decode
            chunks, ids = [], []
            for rid, start, end in plan:
                if start == 0:
                    kv.admit(str(rid), len(seqs[rid]))
                kv.grow(str(rid), end)
                chunks.append(RunnerChunk(seqs[rid][start:end].tolist(), start,
                                          kv.slots(str(rid), 0, end), True))
                ids += experts[rid][start:end].tolist()
            steps.append(runner.forward(chunks, ids))
        logits.append(torch.stack(steps))
    int8, naive, fp32 = logits
    torch.testing.assert_close(int8, naive, atol=1e-3, rtol=1e-4)
    assert (int8 - fp32).abs().max() > 1e-4  # quantized for real
    assert (int8 - fp32).abs().max() < 0.1 * fp32.abs().max()


def test_int8_engine_serves_and_bad_settings_are_refused():
    model = readme()
    engine = Engine(model, char_tokenizer(), "fcfs", Budget(8, 2), kv_blocks=16, block_size=4,
                    quantize="int8")
    out = engine.generate([[5, 6, 7, 8, 9]], SamplingParams(max_tokens=6))[0]
    assert len(out.token_ids) == 6 and out.finished
    with pytest.raises(ReadmoeError, match="unknown quantization 'int4'"):
        Engine(model, char_tokenizer(), quantize="int4")
    with pytest.raises(ReadmoeError, match="CPU kernel"):
        check_quantization("int8", torch.device("cuda"))
    with pytest.raises(ReadmoeError, match="--quantize 'fp8'"):
        EngineOptions(quantize="fp8").validate()


def test_bf16_without_its_kernels_is_refused_with_the_fix(monkeypatch):
    monkeypatch.setattr(cpu_ops, "bf16_applies", lambda ops: False)
    with pytest.raises(ReadmoeError,
                       match="AVX512-BF16, or AVX2 and FMA.*--quantize none, or int8"):
        check_quantization("bf16", torch.device("cpu"))
    with pytest.raises(ReadmoeError, match="on a GPU, serve with --dtype bfloat16"):
        check_quantization("bf16", torch.device("cuda"))
