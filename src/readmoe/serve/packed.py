"""The serving runner's own layout of the backbone's matrices: fused and, on CPU, transposed.

Why: a decode step is a chain of skinny matrix products, so its speed is how fast each weight
streams through the kernel, and each call's fixed cost. Two changes pay, both measured on the
default model at batch 1 (2-core CPU, fp32, 1 thread): fusing the products that read the same
input (q|k|v; gate|up of an expert) into one matrix halves the calls, and on CPU storing each
matrix as ``[in, out]`` (so the product is ``x @ W``) lets the BLAS stream it at about 1.7x the
rate of the ``[out, in]`` layout ``nn.Linear`` keeps (the LM head: 17.7 vs 10.6 GB/s). On CUDA
both layouts run at the same speed, so only fusing is done.

Cost: one extra copy of the attention and FFN matrices (and, on CPU, of the LM head), the
routed experts included when they are resident; with an expert store they are not packed
(the store's fast tier is read as is). The model's own parameters are left untouched, so HF
``generate`` and the router keep working on the same object.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PackedMatrix:
    """``x @ W.T + b`` for an ``nn.Linear``'s W and b, in the faster layout of its device."""

    weight: torch.Tensor  # [in, out] when transposed, else [out, in]
    bias: torch.Tensor | None  # [out]
    transposed: bool

    @classmethod
    def of(cls, *weights: torch.Tensor, biases: tuple[torch.Tensor | None, ...] = ()
           ) -> PackedMatrix:
        """Fuse ``weights`` ([out_i, in] each, one input) along their outputs; ``biases``
        are theirs (all or none)."""
        fused = weights[0] if len(weights) == 1 else torch.cat(weights)  # [sum out_i, in]
        transposed = fused.device.type == "cpu"
        weight = fused.detach().t().contiguous() if transposed else fused.detach().contiguous()
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat([b.detach() for b in biases])
        return cls(weight, bias, transposed)

    @classmethod
    def of_linears(cls, *linears: torch.nn.Linear) -> PackedMatrix:
        return cls.of(*(m.weight for m in linears), biases=tuple(m.bias for m in linears))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.transposed:
            return torch.nn.functional.linear(x, self.weight, self.bias)
        return x @ self.weight if self.bias is None else torch.addmm(self.bias, x, self.weight)


@dataclass(frozen=True)
class PackedExpert:
    """One SwiGLU expert: ``down(act(gate x) * up x)`` with gate|up fused."""

    gate_up: PackedMatrix  # -> [*, 2R]
    down: PackedMatrix  # [*, R] -> [*, H]


@dataclass(frozen=True)
class PackedLayer:
    qkv: PackedMatrix  # [N, H] -> [N, (heads + 2 kv_heads) * D]
    o: PackedMatrix  # [N, heads * D] -> [N, H]
    shared: PackedExpert | None
    experts: tuple[PackedExpert, ...] | None  # resident routed experts, by id


def pack_layer(layer: torch.nn.Module, routed: bool) -> PackedLayer:
    """Pack one decoder layer; ``routed`` False leaves its routed experts to a store."""
    attn, mlp = layer.self_attn, layer.mlp
    shared = None
    if mlp.shared is not None:
        s = mlp.shared
        shared = PackedExpert(PackedMatrix.of_linears(s.gate_proj, s.up_proj),
                              PackedMatrix.of_linears(s.down_proj))
    experts = None
    if routed and mlp.experts is not None:
        stacked = mlp.experts
        experts = tuple(PackedExpert(PackedMatrix.of(stacked.gate_proj[e], stacked.up_proj[e]),
                                     PackedMatrix.of(stacked.down_proj[e]))
                        for e in range(stacked.gate_proj.shape[0]))
    return PackedLayer(PackedMatrix.of_linears(attn.q_proj, attn.k_proj, attn.v_proj),
                       PackedMatrix.of_linears(attn.o_proj), shared, experts)
