"""Which kernels could make decode faster on this machine: precision and compilation, measured.

Why: the engine's decode is bounded by its matrix products (``engine_speed.py``'s matmul
floor), so a faster path must come from faster products (lower precision: fewer bytes to
stream, or faster arithmetic) or from fewer, fused small ops (``torch.compile``). Neither is
adopted on faith; this measures both on the served model's own matrices.

1. Matmul floor per precision: every matrix one decode step of the model multiplies (q|k|v,
   o, the shared expert, one routed expert per layer, the LM head), each a distinct tensor
   (as in a real step, the weights stream from memory rather than sit in cache), at rows 1, 8
   and 32: fp32 ``x @ W`` (the engine's layout for one row), fp32 through oneDNN's prepacked
   weight at every row count (``float32-onednn``), through the fused ops' panels
   (``float32-panels``, AVX2 or AVX-512 CPUs, ``serve/csrc/gemm.cpp``, ``gemm_avx2.cpp``) and
   as the engine multiplies (``float32-served``: ``x @ W`` for one row, the panels or else
   oneDNN from two, ``serve/packed.py``), through bf16 panels (``bf16-panels``: what
   ``--quantize bf16`` runs, ``gemm_bf16.cpp``, ``gemm_bf16_avx2.cpp``), torch's bf16
   and fp16 ``x @ W``, int8 weight-only
   (``torch._weight_int8pack_mm``, per-channel scales) and fbgemm's dynamic int8 linear
   (``torch.ops.quantized.linear_dynamic``: activations quantized per call, per tensor), and
   the engine's ``--quantize int8`` product (the same kernel with per-token activation
   scales, ``serve/quantized.py``). Each reports its worst relative error against fp32 and
   the bytes one routed expert takes (what an expert cache moves per load).
2. ``torch.compile`` (inductor, dynamic shapes) of one decoder layer's decode step against
   the same code eager, at batch 1 and 8: compile seconds and microseconds per call.

Writes results/kernel_probe.{json,md} (``--name``: another name, e.g. for a run with torch's
kernels limited by ``ONEDNN_MAX_CPU_ISA`` / ``MKL_ENABLE_INSTRUCTIONS``; such settings are
recorded with the results).

    .venv/bin/python benchmarks/kernel_probe.py [--model DIR] [--threads 1] [--no-compile]
        [--name NAME]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from readmoe.io import command_line, write_results
from readmoe.models import load_model
from readmoe.serve import cpu_ops
from readmoe.serve.packed import PREPACK_ROWS, PackedMatrix, to_bf16_panels, to_panels
from readmoe.serve.quantized import REDUCE_RANGE, Int8Matrix, quantize_weight

Product = Callable[[torch.Tensor], torch.Tensor]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="runs/demo/train-readme/round-1")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--results", default="results")
    parser.add_argument("--name", default="kernel_probe", help="results file name")
    return parser.parse_args()


def step_matrices(model) -> list[torch.Tensor]:
    """[out, in] weights of one decode step: layer by layer, routed expert ``layer % E``."""
    mats = []
    for index, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        mats.append(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
        mats.append(attn.o_proj.weight)
        if mlp.shared is not None:
            mats.append(torch.cat([mlp.shared.gate_proj.weight, mlp.shared.up_proj.weight]))
            mats.append(mlp.shared.down_proj.weight)
        if mlp.experts is not None:
            e = index % mlp.experts.gate_proj.shape[0]
            mats.append(torch.cat([mlp.experts.gate_proj[e], mlp.experts.up_proj[e]]))
            mats.append(mlp.experts.down_proj[e])
    mats.append(model.lm_head.weight)
    return [m.detach().float().contiguous() for m in mats]


def expert_matrices(model) -> list[torch.Tensor]:
    mlp = next(layer.mlp for layer in model.model.layers if layer.mlp.experts is not None)
    return [torch.cat([mlp.experts.gate_proj[0], mlp.experts.up_proj[0]]).detach().float(),
            mlp.experts.down_proj[0].detach().float()]


def prepare(kind: str, weight: torch.Tensor) -> tuple[Product, int]:
    """A product ``x -> x @ weight.T`` in ``kind`` and the bytes its weights take."""
    if kind in ("float32", "bfloat16", "float16"):
        dtype = getattr(torch, kind)
        packed = weight.t().contiguous().to(dtype)
        if dtype == torch.float32:
            return (lambda x: x @ packed), packed.numel() * 4
        return (lambda x: (x.to(dtype) @ packed).float()), packed.numel() * 2
    if kind == "float32-onednn":
        blocked = torch.ops.mkldnn._reorder_linear_weight(weight, PREPACK_ROWS)
        return (lambda x: torch.ops.mkldnn._linear_pointwise(x, blocked, None, "none", [], "")
                ), weight.numel() * 4
    if kind == "float32-panels":  # the fused ops' panels (AVX2 or AVX-512) at every row count
        ops = cpu_ops.load()
        if not cpu_ops.panels_apply(ops):
            raise RuntimeError("the panel products need the fused ops and an AVX2 or AVX-512 "
                               "CPU")
        panels = to_panels(weight)
        return (lambda x: ops.panel_linear(x, panels, weight.shape[0], None, None, None)
                ), weight.numel() * 4
    if kind == "bf16-panels":  # what --quantize bf16 runs at every row count
        ops = cpu_ops.load()
        if not cpu_ops.bf16_applies(ops):
            raise RuntimeError("the bf16 panel products need the fused ops and an AVX512-BF16, "
                               "or AVX2 and FMA, CPU")
        panels = to_bf16_panels(weight)
        return (lambda x: ops.panel_linear(x, panels, weight.shape[0], None, None, None)
                ), panels.numel() * 2
    if kind == "float32-served":  # x @ W for one row, the engine's copy (panels or oneDNN's)
        matrix = PackedMatrix.of(weight, prepack=True,
                                 panels=cpu_ops.panels_apply(cpu_ops.load()))
        return matrix, matrix.weight.numel() * 4
    if kind == "int8-weight-only":
        q, scales = quantize_weight(weight)  # the served int8 weights, per output channel
        return (lambda x: torch._weight_int8pack_mm(x, q, scales)), q.numel() + scales.numel() * 4
    if kind == "int8-dynamic":  # fbgemm alone: activations quantized per tensor
        matrix = Int8Matrix.of(weight)
        return (lambda x: torch.ops.quantized.linear_dynamic(x, matrix.packed, REDUCE_RANGE)), (
            matrix.nbytes)
    if kind == "int8-served":  # what --quantize int8 runs: per-token activation scales
        matrix = Int8Matrix.of(weight)
        return matrix, matrix.nbytes
    raise ValueError(kind)


# environment settings that change which kernels run, recorded with the results
LIMITS = ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "READMOE_PANELS")
KINDS = ("float32", "float32-onednn", "float32-panels", "float32-served", "bf16-panels",
         "bfloat16", "float16", "int8-weight-only", "int8-dynamic", "int8-served")


def best_seconds(fn: Callable[[], None], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


@torch.inference_mode()
def precision_rows(model, rows: list[int], repeats: int) -> list[dict]:
    mats = step_matrices(model)
    experts = expert_matrices(model)
    out = []
    gen = torch.Generator().manual_seed(0)
    inputs = {n: {m.shape[1]: torch.randn(n, m.shape[1], generator=gen) for m in mats}
              for n in rows}
    reference = {n: [inputs[n][m.shape[1]] @ m.t() for m in mats] for n in rows}
    for kind in KINDS:
        try:
            products = [prepare(kind, m)[0] for m in mats]
            expert_bytes = sum(prepare(kind, m)[1] for m in experts)
        except (RuntimeError, NotImplementedError) as exc:  # a kernel this build lacks
            out.append({"kind": kind, "error": str(exc).splitlines()[0]})
            continue
        for n in rows:
            xs = [inputs[n][m.shape[1]] for m in mats]

            def step(products=products, xs=xs) -> None:
                for product, x in zip(products, xs, strict=True):
                    product(x)

            error = max(((p(x) - ref).norm() / ref.norm()).item()
                        for p, x, ref in zip(products, xs, reference[n], strict=True))
            out.append({"kind": kind, "rows": n, "seconds": best_seconds(step, repeats),
                        "max_relative_error": error, "bytes_per_expert": expert_bytes})
    base = {r["rows"]: r["seconds"] for r in out if r.get("kind") == "float32"}
    for r in out:
        if "seconds" in r:
            r["speedup_vs_float32"] = base[r["rows"]] / r["seconds"]
    return out


def decoder_layer(heads: int, kv_heads: int, dim: int, hidden: int, inter: int):
    """One decode step of a Llama layer (the runner's decode path), on its own tensors."""
    gen = torch.Generator().manual_seed(0)
    w = {"qkv": torch.randn(hidden, (heads + 2 * kv_heads) * dim, generator=gen) / 30,
         "o": torch.randn(heads * dim, hidden, generator=gen) / 30,
         "gu": torch.randn(hidden, 2 * inter, generator=gen) / 30,
         "down": torch.randn(inter, hidden, generator=gen) / 30, "norm": torch.ones(hidden)}
    pools = [torch.randn(4096, kv_heads, dim, generator=gen) for _ in range(2)]

    def layer(x, cos, sin, write, slots, bias):
        a = torch.rms_norm(x, (hidden,), w["norm"], 1e-5)
        qk, v = (a @ w["qkv"]).split([(heads + kv_heads) * dim, kv_heads * dim], -1)
        qk, v = qk.view(-1, heads + kv_heads, dim), v.view(-1, kv_heads, dim)
        qk = qk * cos + qk.roll(dim // 2, -1) * sin
        q, k = qk.split([heads, kv_heads], 1)
        pools[0].index_copy_(0, write, k)
        pools[1].index_copy_(0, write, v)
        b = x.shape[0]
        keys, values = (p.index_select(0, slots).view(b, -1, kv_heads, dim).transpose(1, 2)
                        for p in pools)
        o = F.scaled_dot_product_attention(q.view(b, kv_heads, -1, dim), keys, values,
                                           attn_mask=bias, scale=dim ** -0.5)
        x = torch.addmm(x, o.reshape(b, -1), w["o"])
        gate, up = (torch.rms_norm(x, (hidden,), w["norm"], 1e-5) @ w["gu"]).chunk(2, -1)
        return torch.addmm(x, F.silu(gate) * up, w["down"])

    def inputs(b: int, length: int):
        return (torch.randn(b, hidden), torch.randn(b, 1, dim), torch.randn(b, 1, dim),
                torch.arange(b) + 4000 - b, torch.arange(b * length),
                torch.zeros(b, 1, 1, length))

    return layer, inputs


@torch.inference_mode()
def compile_rows(model, repeats: int) -> list[dict]:
    c = model.config
    first = model.model.layers[0]
    inter = first.mlp.shared.gate_proj.out_features + (
        first.mlp.experts.gate_proj.shape[1] if first.mlp.experts is not None else 0)
    layer, inputs = decoder_layer(c.num_attention_heads, c.num_key_value_heads,
                                  first.self_attn.head_dim, c.hidden_size, inter)
    start = time.perf_counter()
    compiled = torch.compile(layer, dynamic=True)
    compiled(*inputs(1, 40))
    compile_s = time.perf_counter() - start
    out = []
    for b in (1, 8):
        args = inputs(b, 48)
        compiled(*args)  # a new batch size may recompile: not timed

        def run(fn, args=args) -> None:
            for _ in range(50):
                fn(*args)

        eager, fused = (best_seconds(lambda f=f: run(f), repeats) / 50 for f in (layer, compiled))
        out.append({"batch": b, "eager_us": eager * 1e6, "compiled_us": fused * 1e6,
                    "speedup": eager / fused, "compile_s": compile_s})
    return out


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    started = time.time()
    limits = {name: os.environ[name] for name in LIMITS if name in os.environ}
    summary = {"command": command_line(),
               "machine": f"{platform.machine()} CPU, {args.threads} threads, torch "
                          f"{torch.__version__}"
                          + "".join(f", {name}={value}" for name, value in limits.items()),
               "model": args.model,
               "precision": precision_rows(model, args.rows, args.repeats),
               "compile": [] if args.no_compile else compile_rows(model, args.repeats)}
    summary["seconds"] = round(time.time() - started)
    write_results(Path(args.results), args.name, summary, render(summary))
    return 0


def render(summary: dict) -> str:
    lines = ["# Kernels for decode on this machine: precision and torch.compile", "",
             f"Command: `{summary['command']}`; {summary['machine']}; model "
             f"{summary['model']}; {summary['seconds']} s.", "",
             "One decode step's matrix products (every layer, one routed expert each, the LM "
             "head), best of the repeats:", "",
             "| kernel | rows | ms / step | vs float32 | worst relative error | bytes per "
             "routed expert |", "|---|---:|---:|---:|---:|---:|"]
    for r in summary["precision"]:
        if "error" in r:
            lines.append(f"| {r['kind']} | - | unavailable: {r['error']} | | | |")
            continue
        lines.append(f"| {r['kind']} | {r['rows']} | {r['seconds'] * 1e3:.2f} | "
                     f"{r['speedup_vs_float32']:.2f}x | {r['max_relative_error']:.1e} | "
                     f"{r['bytes_per_expert'] / 1e6:.2f} MB |")
    if summary["compile"]:
        lines += ["", "One decoder layer's decode step, eager vs `torch.compile(dynamic=True)` "
                  "(inductor):", "", "| batch | eager µs | compiled µs | speedup | compile s |",
                  "|---:|---:|---:|---:|---:|"]
        for r in summary["compile"]:
            lines.append(f"| {r['batch']} | {r['eager_us']:.0f} | {r['compiled_us']:.0f} | "
                         f"{r['speedup']:.2f}x | {r['compile_s']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
