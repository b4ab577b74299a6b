"""The serving runner's own layout of the backbone's matrices: fused and, on CPU, transposed.

Why: a decode step is a chain of skinny matrix products, so its speed is how fast each weight
streams through the kernel, and each call's fixed cost. Two changes pay, both measured on the
default model at batch 1 (2-core CPU, fp32, 1 thread): fusing the products that read the same
input (q|k|v; gate|up of an expert) into one matrix halves the calls, and on CPU storing each
matrix as ``[in, out]`` (so the product is ``x @ W``) lets the BLAS stream it at about 1.7x the
rate of the ``[out, in]`` layout ``nn.Linear`` keeps (the LM head: 17.7 vs 10.6 GB/s). On CUDA
both layouts run at the same speed, so only fusing is done.

Products of two rows or more take a third layout on CPU: oneDNN's own blocked copy of the
weight (``prepack``, made once when the runner packs). One decode step's products on the
default ReadME model (every layer, one routed expert each, the LM head;
``benchmarks/kernel_probe.py``, 1 thread): 56.6 -> 40.0 ms at 8 rows, 69.1 -> 64.1 ms at 32;
at one row oneDNN's took 32.3 ms against ``x @ W``'s 23.9, so one row keeps ``x @ W``. vLLM's
CPU backend multiplies through prepacked oneDNN weights too. On AVX2 and AVX-512 CPUs with the
fused ops built, that copy is this library's own panels instead (``csrc/gemm.cpp``,
``csrc/gemm_avx2.cpp``: oneDNN's kernel waits on its streamed weights; the panels prefetch
theirs). On the Xeon (AVX-512) one decode step's products took 0.68x / 0.69x of oneDNN's time
at 8 / 32 rows; on the AMD EPYC (Zen 3, AVX2) 0.57x / 0.79x on 1 thread and 0.54x / 0.71x on
2 (``results/kernel_probe_epyc*.md``). There one row takes the panels too (``min_rows``): the
AVX2 kernel reads four panels side by side, and a dense step's one-row products took 21-22 ms
against ``x @ W``'s 29-30 on one thread (a core reads 3-4 streams faster than one).

Cost: one extra copy of the attention and FFN matrices (and, on CPU, of the LM head), the
routed experts included when they are resident, and a second one where prepacked; with
``--quantize bf16`` only the bf16 panels (half the float32 bytes: the products need nothing
else). With an expert store the routed experts are not packed (the store's fast tier is read
as is). The model's own parameters are left untouched, so HF ``generate`` and the router keep
working on the same object.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers.activations import SiLUActivation

from readmoe.serve import cpu_ops
from readmoe.serve.quantized import Int8Matrix


@dataclass(frozen=True)
class PackedMatrix:
    """``x @ W.T + b`` for an ``nn.Linear``'s W and b, in the faster layout of its device."""

    weight: torch.Tensor  # [in, out] when transposed, else [out, in]; bf16: shape only
    bias: torch.Tensor | None  # [out]
    transposed: bool
    # the copy for 2-48 rows: oneDNN's prepacked [out, in] (an mkldnn tensor), or the fused
    # ops' panels [ceil(out / 48), in, 48] (a strided one)
    blocked: torch.Tensor | None = None

    @classmethod
    def of(cls, *weights: torch.Tensor, biases: tuple[torch.Tensor | None, ...] = (),
           prepack: bool = False, panels: bool = False, bf16: bool = False) -> PackedMatrix:
        """Fuse ``weights`` ([out_i, in] each, one input) along their outputs; ``biases``
        are theirs (all or none). ``prepack``: add the copy for 2-48 rows where it applies,
        the panels if ``panels`` (fp32 CPU only: ``cpu_ops.panels_apply``), else oneDNN's.
        ``bf16``: the copy is bf16 panels instead, which every product then multiplies
        through, whatever its rows (``cpu_ops.bf16_applies``; prefill in the same precision
        as decode, so a served perplexity is the decode's)."""
        fused = weights[0] if len(weights) == 1 else torch.cat(weights)  # [sum out_i, in]
        transposed = fused.device.type == "cpu"
        if bf16:  # the panels serve every product: the [in, out] shape is all that is kept
            weight = shape_only((fused.shape[1], fused.shape[0]))
        elif transposed:
            weight = fused.detach().t().contiguous()
        else:
            weight = fused.detach().contiguous()
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat([b.detach() for b in biases])
        blocked = None
        if bf16:
            blocked = to_bf16_panels(fused.detach())
        elif prepack and panels and fused.device.type == "cpu" and fused.dtype == torch.float32:
            blocked = to_panels(fused.detach())
        elif prepack and prepack_applies(fused.device, fused.dtype):
            blocked = torch.ops.mkldnn._reorder_linear_weight(fused.detach().contiguous(),
                                                              PREPACK_ROWS)
        return cls(weight, bias, transposed, blocked)

    @property
    def bf16(self) -> bool:
        """Whether the copy is bf16 panels, which serve every product."""
        return self.blocked is not None and self.blocked.dtype == torch.bfloat16

    def copy(self, prepacked: bool = True) -> torch.Tensor | None:
        """The blocked copy a product may multiply through: bf16 panels always (they are the
        only copy), another copy unless ``prepacked`` is False (a prefill step's products)."""
        return self.blocked if prepacked or self.bf16 else None

    @property
    def nbytes(self) -> int:
        """Bytes a decode product reads: the bf16 panels where they are the copy, else the
        matrix (+ bias)."""
        bias = 0 if self.bias is None else self.bias.nbytes
        return (self.blocked.nbytes if self.bf16 else self.weight.nbytes) + bias

    def __call__(self, x: torch.Tensor, add: torch.Tensor | None = None,
                 out: torch.Tensor | None = None, prepacked: bool = True) -> torch.Tensor:
        """``x @ W.T + b`` for rows x [n, in], plus ``add`` [n, out] if given (a residual: on
        CPU the BLAS adds it as it writes, one op and one pass fewer), into ``out`` if given
        (a contiguous [n, out] view, so a caller's slice is filled without a copy).
        ``prepacked`` False leaves oneDNN's copy unused (a prefill step's products)."""
        blocked = self.copy(prepacked)
        if blocked is not None and (self.bf16 or min_rows(blocked) <= x.shape[0]
                                    <= BLOCKED_MAX_ROWS):
            if not blocked.is_mkldnn:
                return cpu_ops.load().panel_linear(x, blocked, self.weight.shape[1], self.bias,
                                                   add, out)
            y = (torch.ops.mkldnn._linear_pointwise(x, blocked, self.bias, "none", [], "")
                 if add is None else
                 torch.ops.mkldnn._linear_pointwise.binary(x, add, blocked, self.bias, "add"))
            return y if out is None else out.copy_(y)
        if not self.transposed:
            y = torch.nn.functional.linear(x, self.weight, self.bias)
            y = y if add is None else y.add_(add)
            return y if out is None else out.copy_(y)
        base = self.bias if add is None else add if self.bias is None else add + self.bias
        if base is None:
            return torch.mm(x, self.weight) if out is None else torch.mm(x, self.weight, out=out)
        if out is None:
            return torch.addmm(base, x, self.weight)
        return torch.addmm(base, x, self.weight, out=out)


Matrix = PackedMatrix | Int8Matrix
"""A product the runner calls as ``m(x, add=None, out=None)``: fp32/bf16 or int8 weights."""

PREPACK_ROWS = 32  # the batch oneDNN is told to block for (fastest at 2-32 rows, measured)
BLOCKED_MIN_ROWS = 2  # one row streams faster through ``x @ W`` than oneDNN's (see ``min_rows``)
# Above this, ``x @ W`` is as fast (compute-bound), and oneDNN would create and cache one
# primitive per row count: a prefill's many expert row counts evicted the decode step's from
# its cache (1024 entries), and the first decode step after a batch-32 prefill took 331 ms
# instead of 143 (streamed weights, 1 thread: x @ W / oneDNN 1.21x at 32 rows, 1.09x at 48,
# 0.85x at 64, 0.93-1.12x up to 512).
BLOCKED_MAX_ROWS = 48


def min_rows(blocked: torch.Tensor) -> int:
    """The fewest rows a product multiplies through ``blocked``: BLOCKED_MIN_ROWS for
    oneDNN's copy, the fused ops' ``panel_min_rows()`` for float32 panels (1 where their AVX2
    kernel runs: one row reads four panels side by side there, 1.4x faster than ``x @ W`` on
    one thread, ``csrc/cpu_ops.h``)."""
    return BLOCKED_MIN_ROWS if blocked.is_mkldnn else cpu_ops.load().panel_min_rows()


def shape_only(shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """A float32 tensor of ``shape`` without storage (on the meta device): a bf16-panel
    matrix's ``weight``, which states the [in, out] shape its products take and holds no
    second copy of the weights (touching its data fails loudly instead of reading garbage)."""
    return torch.empty(shape, dtype=torch.float32, device="meta")


PANEL_COLUMNS = 48  # output columns of one panel (csrc/cpu_ops.h kPanelColumns)


def to_panels(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` [out, in] as panels [ceil(out / 48), in, 48]: panel p holds output
    columns 48p .. 48p + 47 (zero past ``out``), one k step's 48 weights contiguous."""
    out, width = weight.shape
    count = -(-out // PANEL_COLUMNS)
    padded = weight.new_zeros(count * PANEL_COLUMNS, width)
    padded[:out] = weight
    return padded.view(count, PANEL_COLUMNS, width).transpose(1, 2).contiguous()


def bf16_panels_shape(out: int, width: int) -> tuple[int, int, int, int]:
    """The shape of an [out, in=width] matrix's bf16 panels (``to_bf16_panels``)."""
    return -(-out // PANEL_COLUMNS), -(-width // 32) * 16, PANEL_COLUMNS, 2


def to_bf16_panels(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` [..., out, in] as bf16 panels [..., ceil(out / 48), pairs, 48, 2] (rounded to
    nearest even; leading dimensions, stacked experts, kept): panel p, k pair j holds columns
    48p .. 48p + 47 of inputs 2j and 2j + 1, the pair innermost (what one VDPBF16PS lane
    multiplies, and an AMX weight tile's layout); pairs: ceil(in / 2) padded to a multiple of
    16 (a tile's depth); zero past ``out`` and ``in``."""
    *lead, out, width = weight.shape
    count, pairs, _, _ = bf16_panels_shape(out, width)
    padded = weight.new_zeros(*lead, count * PANEL_COLUMNS, 2 * pairs)
    padded[..., :out, :width] = weight
    return (padded.view(*lead, count, PANEL_COLUMNS, pairs, 2).transpose(-3, -2).contiguous()
            .to(torch.bfloat16))


def prepack_applies(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether oneDNN can prepack here: CPU fp32 with torch's oneDNN ops."""
    return (device.type == "cpu" and dtype == torch.float32
            and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


@dataclass(frozen=True)
class Packing:
    """How the runner packs its matrices: ``quantize`` "int8" or the model's dtype, whether
    fp32 matrices get a copy for 2-48 rows too, and whether that copy is the panels;
    ``quantize`` "bf16": every fp32 matrix gets bf16 panels, used for every product
    (whatever ``prepack`` says)."""

    quantize: str = "none"
    prepack: bool = False
    panels: bool = False

    def of(self, *weights: torch.Tensor, biases: tuple[torch.Tensor | None, ...] = ()
           ) -> Matrix:
        if self.quantize == "int8":
            return Int8Matrix.of(*weights, biases=biases)
        return PackedMatrix.of(*weights, biases=biases, prepack=self.prepack,
                               panels=self.panels, bf16=self.quantize == "bf16")

    def of_linears(self, *linears: torch.nn.Linear) -> Matrix:
        return self.of(*(m.weight for m in linears), biases=tuple(m.bias for m in linears))


@dataclass(frozen=True)
class PackedExpert:
    """One SwiGLU expert: ``down(act(gate x) * up x)`` with gate|up fused."""

    gate_up: Matrix  # -> [*, 2R]
    down: Matrix  # [*, R] -> [*, H]


@dataclass(frozen=True)
class Norm:
    """An RMSNorm's weight and epsilon, read once (not through the module every step)."""

    weight: torch.Tensor  # [H]
    eps: float


def norm_of(module: torch.nn.Module) -> Norm:
    return Norm(module.weight.detach(), module.variance_epsilon)


def activation_of(module: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The expert activation as a plain function where it is SiLU (an ``nn.Module`` call
    costs more than the op at decode sizes), else the module itself."""
    silu = isinstance(module, torch.nn.SiLU | SiLUActivation)
    return torch.nn.functional.silu if silu else module


@dataclass(frozen=True)
class PackedLayer:
    qkv: Matrix  # [N, H] -> [N, (heads + 2 kv_heads) * D]
    o: Matrix  # [N, heads * D] -> [N, H]
    shared: PackedExpert | None
    experts: tuple[PackedExpert, ...] | None  # resident routed experts, by id
    input_norm: Norm
    post_attention_norm: Norm
    act: Callable[[torch.Tensor], torch.Tensor]  # the experts' (SwiGLU's gate activation)


def pack_layer(layer: torch.nn.Module, routed: bool, kind: Packing = Packing()) -> PackedLayer:
    """Pack one decoder layer; ``routed`` False leaves its routed experts to a store (whose
    slots hold the model's own dtype, whatever ``kind`` says)."""
    attn, mlp = layer.self_attn, layer.mlp
    shared = None
    if mlp.shared is not None:
        s = mlp.shared
        shared = PackedExpert(kind.of_linears(s.gate_proj, s.up_proj),
                              kind.of_linears(s.down_proj))
    experts = None
    if routed and mlp.experts is not None:
        stacked = mlp.experts
        experts = tuple(PackedExpert(kind.of(stacked.gate_proj[e], stacked.up_proj[e]),
                                     kind.of(stacked.down_proj[e]))
                        for e in range(stacked.gate_proj.shape[0]))
    act = activation_of(mlp.experts.act_fn if mlp.experts is not None else mlp.shared.act_fn)
    return PackedLayer(kind.of_linears(attn.q_proj, attn.k_proj, attn.v_proj),
                       kind.of_linears(attn.o_proj), shared, experts,
                       norm_of(layer.input_layernorm), norm_of(layer.post_attention_layernorm),
                       act)
