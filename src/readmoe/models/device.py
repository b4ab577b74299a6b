"""Where a stage runs: one device and one dtype, chosen in one place for every command.

Why one helper: each stage (stats, refactor, train, eval, analyze, bench, serve, generate)
loads a model, and each must make the same choice the same way: CUDA with bfloat16 when a GPU
is present, else the CPU in float32 (bf16 matmuls on a CPU are slower than fp32 and lose
precision for nothing). An explicit ``--device`` / ``--dtype`` always wins; asking for CUDA
on a machine without it is refused with the fix, never silently moved to the CPU.

Training keeps fp32 master weights whatever the dtype: on a reduced dtype it runs the forward
under ``torch.autocast`` (``Placement.autocast``) instead of casting the weights, so AdamW's
updates are not rounded away.
"""

from __future__ import annotations

import argparse
import contextlib
from dataclasses import dataclass

import torch

from readmoe.errors import ReadmoeError

DEVICES = ("cpu", "cuda")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Placement:
    """A device and the dtype models compute in there."""

    device: torch.device
    dtype: torch.dtype

    @property
    def dtype_name(self) -> str:
        return next(name for name, dtype in DTYPES.items() if dtype == self.dtype)

    @property
    def reduced(self) -> bool:
        """Whether the dtype is narrower than fp32 (training then autocasts)."""
        return self.dtype != torch.float32

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision for training's forward passes; a no-op in fp32."""
        if not self.reduced:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def describe(self) -> str:
        return f"{self.device} {self.dtype_name}"

    def to_dict(self) -> dict:
        return {"device": str(self.device), "dtype": self.dtype_name}


def resolve_placement(device: str | None = None, dtype: str | None = None) -> Placement:
    """The placement for ``device`` / ``dtype`` (names; None picks the machine's default)."""
    cuda = torch.cuda.is_available()
    if device is None:
        device = "cuda" if cuda else "cpu"
    kind = device.split(":", 1)[0]
    if kind not in DEVICES:
        raise ReadmoeError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)} "
                           "(cuda:N for one GPU of several)")
    if kind == "cuda" and not cuda:
        raise ReadmoeError(f"--device {device} asked for a GPU but torch sees none (torch "
                           f"{torch.__version__}); run with --device cpu, or install a CUDA "
                           "build of torch")
    if dtype is None:
        dtype = "bfloat16" if kind == "cuda" else "float32"
    if dtype not in DTYPES:
        raise ReadmoeError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ReadmoeError(f"bad device {device!r} ({exc})") from None
    if resolved.type == "cuda" and resolved.index is not None and (
            resolved.index >= torch.cuda.device_count()):
        raise ReadmoeError(f"--device {device}: this machine has {torch.cuda.device_count()} "
                           "GPU(s), numbered from 0")
    return Placement(resolved, DTYPES[dtype])


def add_placement_args(parser: argparse.ArgumentParser) -> None:
    """``--device`` and ``--dtype`` on a command that loads a model."""
    parser.add_argument("--device", default=None,
                        help="cpu, cuda or cuda:N (default: cuda when a GPU is present, "
                        "else cpu)")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                        help="weights and compute dtype (default: bfloat16 on cuda, float32 "
                        "on cpu; training keeps fp32 weights and autocasts)")


def placement_from_args(args: argparse.Namespace) -> Placement:
    return resolve_placement(args.device, args.dtype)
