"""How an expert store holds one expert: the layout, and precision, the runner multiplies.

Why: a slot is read by compute as is, so it must already be in the runner's layout for its
device (``packed.py``: gate|up fused; ``[in, out]`` on CPU, ``[out, in]`` on CUDA), and a
load is then one contiguous copy per matrix. With ``--quantize bf16`` (CPU) the slots hold the
bf16 panels the runner's own matrices use: the experts compute as the resident ones do and
each load moves about half the bytes of a float32 expert (``expert_bytes``), which is what an
expert cache's misses cost behind a slow link.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from readmoe.serve.packed import (
    PackedExpert,
    PackedMatrix,
    bf16_panels_shape,
    shape_only,
    to_bf16_panels,
)
from readmoe.serve.quantized import check_quantization


@dataclass(frozen=True)
class SlotFormat:
    """``transposed``: the CPU's ``[in, out]`` layout; ``bf16``: bf16 panels (CPU only)."""

    transposed: bool
    bf16: bool = False

    @classmethod
    def of(cls, device: torch.device, quantize: str = "none") -> SlotFormat:
        """The format for a runner on ``device`` packing with ``quantize``: bf16 panels for
        "bf16", the model's own dtype otherwise (an int8 runner computes store slots in it)."""
        check_quantization(quantize, device)  # bf16: the CPU's panels (AVX512-BF16 or AVX2)
        return cls(device.type == "cpu", quantize == "bf16")

    @property
    def name(self) -> str:
        return "bf16 panels" if self.bf16 else "the model's dtype"

    def pack(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """One expert's (gate|up, down) as a load copies it, from gate, up [..., R, H] and
        down [..., H, R] (leading dimensions, stacked experts, kept): bf16 panels, else
        ``[H, 2R]`` and ``[R, H]`` when transposed, ``[2R, H]`` and ``[H, R]`` when not."""
        gate_up = torch.cat([gate, up], dim=-2)  # [..., 2R, H]
        if self.bf16:
            return to_bf16_panels(gate_up.float()), to_bf16_panels(down.float())
        if self.transposed:
            return gate_up.transpose(-1, -2).contiguous(), down.transpose(-1, -2).contiguous()
        return gate_up.contiguous(), down.contiguous()

    def slot_shapes(self, size: int, hidden: int
                    ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The shapes of one slot's (gate|up, down) for experts of ``size`` R, width H."""
        if self.bf16:
            return bf16_panels_shape(2 * size, hidden), bf16_panels_shape(hidden, size)
        if self.transposed:
            return (hidden, 2 * size), (size, hidden)
        return (2 * size, hidden), (hidden, size)

    def slot_dtype(self, saved: torch.dtype) -> torch.dtype:
        return torch.bfloat16 if self.bf16 else saved

    def expert(self, gate_up: torch.Tensor, down: torch.Tensor, size: int, hidden: int
               ) -> PackedExpert:
        """The runner's view of one slot's tensors (``slot_shapes``)."""
        if self.bf16:
            return PackedExpert(PackedMatrix(shape_only((hidden, 2 * size)), None, True, gate_up),
                                PackedMatrix(shape_only((size, hidden)), None, True, down))
        return PackedExpert(PackedMatrix(gate_up, None, self.transposed),
                            PackedMatrix(down, None, self.transposed))


def slot_tensors(expert: PackedExpert) -> tuple[torch.Tensor, torch.Tensor]:
    """Where a load into a slot viewed as ``expert`` copies (gate|up, down)."""
    return tuple(m.blocked if m.bf16 else m.weight for m in (expert.gate_up, expert.down))
