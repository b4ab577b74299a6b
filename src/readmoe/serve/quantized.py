"""Int8 matrices for CPU decode: fbgemm's dynamic int8 linear on per-channel int8 weights.

Why this kernel: ``benchmarks/kernel_probe.py`` timed every product a decode step makes on the
machine this was first built on (2-core AVX2 EPYC, 1 thread): bf16 and fp16 ran slower than
fp32 there and torch's int8 weight-only matmul far slower, while fbgemm's dynamic int8 linear
(activations quantized per call, int8 x int8 -> int32) was several times faster than fp32 at
batch 1 and still ahead at 32; its weights take a quarter of the bytes, which also shrinks
what an expert cache would move. It is a CPU kernel: serving on a GPU keeps fp32/bf16. On CPUs
with AVX512-BF16 (and AMX), and on AVX2 CPUs through this library's own kernel,
``--quantize bf16`` is the closer choice and mostly the faster one (bf16 panels,
``csrc/gemm_bf16.cpp``, ``gemm_bf16_avx2.cpp``, checked here too): 1.7-2.0x the float32 engine
on the Xeon, 1.2-2.0x on the AMD EPYC, at the float32 perplexity, where int8 costs 13% of it
(``results/engine_speed.md``, ``engine_speed_xeon.md``).

Quantization (``quantize_weight``): symmetric per output channel, scale = max |w| / 127, so
each row's largest weight is exact. Activations are quantized per call to 7 bits
(``reduce_range``: with 8 bits AVX2's u8 x s8 pair sums can saturate int16; with 7 they
cannot), per token: fbgemm quantizes a whole tensor with one scale, so each row is first
divided by its own max |x| and the product multiplied back. Without that, one token's
outlier channels coarsen every other token's grid: held-out perplexity of the dense default
model (news + code, 256-token windows) was 18.27 in fp32, 48.2 per tensor, 19.8 per token
(8 bits per token: 18.7, not taken for the saturation risk). ``reference_product`` spells
the arithmetic out naively (the exactness tests).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from readmoe.errors import ReadmoeError

QUANTIZATIONS = ("none", "int8", "bf16")
REDUCE_RANGE = True
ACTIVATION_LEVELS = 127 if REDUCE_RANGE else 255  # activation steps (7 or 8 bits)


def check_quantization(name: str, device: torch.device,
                       dtype: torch.dtype = torch.float32) -> None:
    if name not in QUANTIZATIONS:
        raise ReadmoeError(f"unknown quantization {name!r}; choose one of "
                           f"{', '.join(QUANTIZATIONS)}")
    if name == "int8":
        if device.type != "cpu":
            raise ReadmoeError("int8 serving uses fbgemm, a CPU kernel: serve on the CPU, or "
                               "leave --quantize none on a GPU (bf16 there)")
        if dtype != torch.float32:
            raise ReadmoeError(f"int8 serving computes its activations in float32; the model "
                               f"is loaded in {str(dtype).removeprefix('torch.')}: load it "
                               "with --dtype float32")
        if "fbgemm" not in torch.backends.quantized.supported_engines:
            raise ReadmoeError(f"this torch build ({torch.__version__}) has no fbgemm kernels: "
                               "serve with --quantize none")
    if name == "bf16":
        from readmoe.serve import cpu_ops

        if device.type != "cpu" or dtype != torch.float32:
            raise ReadmoeError("--quantize bf16 is the CPU's bf16 panels for a float32 model: "
                               "load it on the CPU with --dtype float32 (on a GPU, serve with "
                               "--dtype bfloat16 instead)")
        if not cpu_ops.bf16_applies(cpu_ops.load()):
            raise ReadmoeError("--quantize bf16 needs the fused CPU ops built and a CPU with "
                               "AVX512-BF16, or AVX2 and FMA (this one has neither, or the ops "
                               "did not build): serve with --quantize none, or int8")


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float -> (int8 [out, in], float scales [out])."""
    w = weight.detach().float()
    scales = (w.abs().amax(dim=1) / 127).clamp_min(torch.finfo(torch.float32).tiny)
    return (w / scales[:, None]).round().clamp(-127, 127).to(torch.int8), scales


@dataclass(frozen=True)
class Int8Matrix:
    """``x @ W.T + b`` with W in int8 (a ``PackedMatrix`` stand-in: same call)."""

    packed: object  # fbgemm's prepacked weight
    bias: torch.Tensor | None  # [out], added after the per-token rescale
    nbytes: int  # int8 weights + scales (+ bias)

    @classmethod
    def of(cls, *weights: torch.Tensor, biases: tuple[torch.Tensor | None, ...] = ()
           ) -> Int8Matrix:
        """Fuse ``weights`` ([out_i, in] each) along their outputs, as ``PackedMatrix.of``."""
        fused = weights[0] if len(weights) == 1 else torch.cat(weights)
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat([b.detach().float() for b in biases])
        q, scales = quantize_weight(fused)
        zero = torch.zeros(q.shape[0], dtype=torch.long)
        with warnings.catch_warnings():  # torch marks quantized tensors deprecated, still works
            warnings.simplefilter("ignore")
            qweight = torch._make_per_channel_quantized_tensor(q, scales.double(), zero, 0)
            packed = torch.ops.quantized.linear_prepack(qweight, None)
        nbytes = q.numel() + scales.numel() * 4 + (0 if bias is None else bias.numel() * 4)
        return cls(packed, bias, nbytes)

    @classmethod
    def of_linears(cls, *linears: torch.nn.Linear) -> Int8Matrix:
        return cls.of(*(m.weight for m in linears), biases=tuple(m.bias for m in linears))

    def __call__(self, x: torch.Tensor, add: torch.Tensor | None = None,
                 out: torch.Tensor | None = None, prepacked: bool = True) -> torch.Tensor:
        """As ``PackedMatrix``'s call; ``prepacked`` (its switch for oneDNN's copy) has
        nothing to switch here: int8 matrices have no such copy."""
        if x.shape[0] == 1:  # one row: the kernel's per-tensor grid is already per token
            y = torch.ops.quantized.linear_dynamic(x.contiguous(), self.packed, REDUCE_RANGE)
            y = y if add is None else y.add_(add)
        else:
            rows = row_scales(x)  # [n, 1]
            y = torch.ops.quantized.linear_dynamic(x / rows, self.packed, REDUCE_RANGE)
            y = y.mul_(rows) if add is None else torch.addcmul(add, y, rows)
        if self.bias is not None:
            y.add_(self.bias)
        return y if out is None else out.copy_(y)


def row_scales(x: torch.Tensor) -> torch.Tensor:
    """Each row's max |x| ([n, 1]; a zero row gets 1, not a division by zero)."""
    scales = torch.linalg.vector_norm(x, float("inf"), dim=1, keepdim=True)
    return scales.masked_fill_(scales == 0, 1.0)


def reference_product(x: torch.Tensor, weight: torch.Tensor,
                      bias: torch.Tensor | None = None) -> torch.Tensor:
    """What ``Int8Matrix.of(weight, biases=(bias,))(x)`` computes, spelled out in float64:
    each row of x divided by its max |x| (unless x is one row); that tensor quantized to
    ``ACTIVATION_LEVELS`` steps (scale and zero point chosen, and values rounded, by torch's
    own per-tensor routines, as the kernel does: a tie such as the zero point of [-1, 1]
    rounds as in float32); W per channel; the integer products; then the three scales
    (tensor, channel, row)."""
    q, scales = quantize_weight(weight)
    rows = row_scales(x) if x.shape[0] > 1 else torch.ones(1, 1)  # one row: as it is
    x = x / rows  # in float32, as the kernel's input is
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scale, zero = torch._choose_qparams_per_tensor(x, REDUCE_RANGE)
        xq = torch.quantize_per_tensor(x, scale, zero, torch.quint8).int_repr().double()
    y = (xq - zero) @ q.double().t() * scale * scales.double() * rows.double()
    return (y if bias is None else y + bias.double()).float()
