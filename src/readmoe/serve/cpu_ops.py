"""The runner's fused CPU ops (``csrc/``), built once per machine, or nothing.

Why: on CPU a decode step's matrix products run near their floor, and what the engine loses
beside them is the small ops around them (norms, RoPE and the KV write, the paged-attention
gathers and the attention itself, SiLU times up), each several ATen calls at sizes where a
call's fixed cost is its whole cost, and the Python between the calls. ``kernels.cpp`` and
``attention.cpp`` (the decode attention over the paged pools) do each small op in one call
and one pass, as vLLM's CPU backend and llama.cpp do; ``layer.cpp`` runs a layer's attention
block (decode-only steps) and its MoE FFN as one call each; ``gemm.cpp`` (AVX-512) and
``gemm_avx2.cpp`` multiply 2-48 rows faster than oneDNN's prepacked kernel (its weights' next
panel prefetched while one is multiplied; ``panels_apply``; on AVX2 one row too, four panels
read side by side), ``gemm_bf16.cpp`` (AVX512-BF16,
AMX) and ``gemm_bf16_avx2.cpp`` every row count on bf16 panels (``--quantize bf16``);
``decoder.cpp`` and ``router.cpp`` run a decode-only step of the backbone (embedding to final
norm) and of the pre-gating router as one call each, ``team.cpp`` the backbone's layers of a
2-48-row step as one parallel region; ``read_probe.cpp`` measures the read bandwidth that
benchmarks divide by; ``module.cpp`` binds them for Python.

The extension is compiled with torch's ``cpp_extension`` the first time a runner asks for it
(about a minute on a 2-core CPU; it needs a C++ compiler, and ``ninja``, a dependency) into
``$XDG_CACHE_HOME/readmoe/cpu_ops/<key>`` (key: the sources, flags, torch and Python), and is
loaded from there afterwards. Where it cannot be built the runner keeps its torch ops (the
same results; a warning says why), as it does on GPU and for dtypes other than fp32.
``READMOE_CPU_OPS=0`` turns the fused ops off (to compare, or to rule them out).
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import sys
import warnings
from pathlib import Path
from types import ModuleType

import torch

CSRC = Path(__file__).parent / "csrc"
SOURCES = ("kernels.cpp", "attention.cpp", "layer.cpp", "gemm.cpp", "gemm_avx2.cpp",
           "gemm_bf16.cpp", "gemm_bf16_avx2.cpp", "decoder.cpp", "team.cpp", "router.cpp",
           "read_probe.cpp", "module.cpp")
DISABLE = "READMOE_CPU_OPS"
PANELS = "READMOE_PANELS"


def compile_flags() -> list[str]:
    """-O3, no contraction of a*b + c into FMA (so results round as separate ATen ops do),
    OpenMP (``at::parallel_for`` splits work only in code built with it; the library is the
    libgomp torch already loaded, same soname), AVX2/FMA/F16C code where torch itself runs AVX2
    or better kernels (every AVX2 CPU has F16C: float16 KV pools), never -march=native (this
    project's reference machine advertises AVX-512 it cannot execute)."""
    flags = ["-O3", "-ffp-contract=off", "-fopenmp"]
    x86 = platform.machine().lower() in {"x86_64", "amd64"}
    if x86 and torch.backends.cpu.get_cpu_capability() in {"AVX2", "AVX512"}:
        flags += ["-mavx2", "-mfma", "-mf16c"]
    return flags


def build_dir(flags: list[str]) -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    texts = [path.read_text() for path in sorted(CSRC.iterdir()) if path.is_file()]
    key = hashlib.sha256("\n".join([*texts, *flags, torch.__version__,
                                    sys.version]).encode()).hexdigest()[:16]
    return cache / "readmoe" / "cpu_ops" / key


@functools.cache
def load() -> ModuleType | None:
    """The compiled ops, or None where they are turned off or cannot be built (warned)."""
    if os.environ.get(DISABLE, "1") == "0":
        return None
    from torch.utils import cpp_extension

    flags = compile_flags()
    directory = build_dir(flags)
    directory.mkdir(parents=True, exist_ok=True)
    bin_dir = _ninja_bin_dir()
    if bin_dir and bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    if not any(directory.glob("*.so")):
        print(f"readmoe: building the fused CPU ops once into {directory} (about a minute)",
              file=sys.stderr, flush=True)
    try:
        return cpp_extension.load(name="readmoe_cpu_ops",
                                  sources=[str(CSRC / name) for name in SOURCES],
                                  extra_cflags=flags, extra_ldflags=["-fopenmp"],
                                  build_directory=str(directory),
                                  verbose=False)
    except Exception as error:  # noqa: BLE001 - any build failure leaves the torch ops
        warnings.warn(f"readmoe's fused CPU ops could not be built ({type(error).__name__}: "
                      f"{str(error).strip()[-300:]}); the runner uses torch ops instead, "
                      f"slower at decode. Install a C++ compiler and ninja, or set {DISABLE}=0 "
                      "to silence this.", RuntimeWarning, stacklevel=2)
        return None


def ops_for(device: torch.device, dtype: torch.dtype) -> ModuleType | None:
    """The fused ops where they apply (CPU, fp32), else None."""
    if device.type != "cpu" or dtype != torch.float32:
        return None
    return load()


def panels_apply(ops: ModuleType | None) -> bool:
    """Whether fp32 products of 2-48 rows go through the fused ops' panels (``gemm.cpp``,
    ``gemm_avx2.cpp``) instead of oneDNN's prepacked copy: ops built, an AVX2 or AVX-512 CPU
    (torch's own kernels use it here, and the CPU says so at run time), ``READMOE_PANELS``
    not 0 (to compare)."""
    return (ops is not None and os.environ.get(PANELS, "1") != "0"
            and torch.backends.cpu.get_cpu_capability() in {"AVX2", "AVX512"}
            and ops.panels_supported())


def bf16_applies(ops: ModuleType | None) -> bool:
    """Whether products can multiply through bf16 panels here: ops built and a CPU with
    AVX512-BF16 (``gemm_bf16.cpp``) or AVX2 and FMA (``gemm_bf16_avx2.cpp``)."""
    return ops is not None and ops.bf16_panels_supported()


def _ninja_bin_dir() -> str | None:
    try:
        import ninja
    except ImportError:
        return None
    return ninja.BIN_DIR
