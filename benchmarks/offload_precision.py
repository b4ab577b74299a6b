"""What bf16 experts buy an offloaded server: bytes per expert, bytes moved, and latency behind
the same link, float32 against ``--quantize bf16`` (the store's slots in the runner's bf16
panels, ``serve/experts/slots.py``).

Why: an expert cache's misses cost what a load moves, so halving an expert's bytes should cut
the time a slow link stalls compute, on top of bf16's faster products. The link is a property
of the hardware, not of the precision, so both precisions run behind one emulated link: the
one at which a float32 expert of one layer loads in one float32 layer's compute (the
``link`` setting of ``benchmarks/codesign.py``, calibrated on the float32 resident run); the
``ram`` setting copies within RAM. Each precision's own resident engine is its reference.
Systems: ``readme-lru`` (no foresight) and ``readme-codesign`` (``serve/systems.py``). Each
repeat runs every row, the precisions' order alternating; reported: medians over repeats.

Needs ``make demo`` first (its trained ReadME model and corpus) and a CPU with AVX512-BF16.
Writes results/offload_precision.{json,md}.

    .venv/bin/python benchmarks/offload_precision.py [--repeats 3] [--cells link:0.5 ram:0.5]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics

import torch
from codesign import ENGINE_BUDGET, add_engine_cell_args, engine_cell_inputs, summarize_run
from tqdm import tqdm

from readmoe.errors import ReadmoeError
from readmoe.io import command_line, write_results
from readmoe.serve.engine import Engine
from readmoe.serve.experts.store import ExpertStore
from readmoe.serve.placement import routed_expert_bytes
from readmoe.serve.quantized import check_quantization
from readmoe.serve.systems import calibrate, capacity_for, make_settings, make_system, run_engine

PRECISIONS = ("none", "bf16")
SYSTEMS = ("readme-lru", "readme-codesign")
LABEL = {"none": "float32", "bf16": "bf16"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_engine_cell_args(parser, ["link:0.33", "link:0.5", "ram:0.5"])
    parser.add_argument("--repeats", type=int, default=3)
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    check_quantization("bf16", torch.device("cpu"))  # says why where this CPU cannot
    torch.set_num_threads(1)  # the other core is the copy engine's
    readme, tokenizer, resident, offloaded, specs = engine_cell_inputs(args)
    cells = [(cell.split(":")[0], float(cell.split(":")[1])) for cell in args.cells]
    if any(name not in ("ram", "link") for name, _ in cells):
        raise ReadmoeError(f"--cells takes ram:SHARE or link:SHARE, got {args.cells}")
    calibration = {q: calibrate(resident, tokenizer, readme, specs, ENGINE_BUDGET, quantize=q)
                   for q in PRECISIONS}
    link = calibration["none"]["link_bandwidth"]
    settings = {q: make_settings(calibration[q], sorted({n for n, _ in cells}), link)
                for q in PRECISIONS}
    routed = routed_expert_bytes(resident)
    experts = resident.config.num_experts
    sizes = {q: expert_sizes(readme, q) for q in PRECISIONS}
    runs: dict[tuple, list[dict]] = {}
    rows = [(q, None, None) for q in PRECISIONS] + [
        (q, cell, name) for q in PRECISIONS for cell in cells for name in SYSTEMS]
    progress = tqdm(total=args.repeats * len(rows), desc="engine runs")
    for repeat in range(args.repeats):
        order = PRECISIONS if repeat % 2 == 0 else PRECISIONS[::-1]
        for q in order:
            engine = Engine(resident, tokenizer, "fcfs", ENGINE_BUDGET, kv_blocks=2048,
                            quantize=q)
            metrics = engine.run_workload(specs)
            metrics["fast_tier_bytes"] = experts * sum(sizes[q])
            runs.setdefault((q, None, None), []).append(summary(metrics, None))
            progress.update()
            for cell in cells:
                setting, slots = settings[q][cell[0]], capacity_for(cell[1], experts)
                for name in SYSTEMS:
                    system = make_system(name, setting, capacity=slots, num_experts=experts)
                    metrics = run_engine(system, offloaded, tokenizer, str(readme), specs=specs,
                                         share=cell[1], setting=setting, routed_bytes=routed,
                                         budget=ENGINE_BUDGET, kv_blocks=2048, quantize=q)
                    runs.setdefault((q, cell, name), []).append(summary(metrics, slots))
                    progress.update()
    progress.close()
    write(args, readme, calibration, settings, runs, experts, sizes)
    return 0


def expert_sizes(readme, quantize: str) -> list[int]:
    """Bytes of one routed expert in each routed layer, as the store holds it."""
    with ExpertStore(readme, capacity=1, tier="file", quantize=quantize) as store:
        return [store.expert_bytes[layer] for layer in store.routed_layers]


def summary(metrics: dict, slots: int | None) -> dict:
    return {**summarize_run(metrics, slots), "output_tokens": metrics["output_tokens"]}


def shown(value: float | None, scale: float, spec: str, unit: str = "") -> str:
    return "-" if value is None else f"{value * scale:{spec}}{unit}"


def median(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def write(args: argparse.Namespace, readme, calibration: dict, settings: dict, runs: dict,
          experts: int, sizes: dict) -> None:
    result = {"command": command_line(), "threads": 1, "model": str(readme),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
                         f"torch {torch.__version__}",
              "link_bytes_per_s": calibration["none"]["link_bandwidth"],
              "calibration": {LABEL[q]: c for q, c in calibration.items()},
              "settings": {LABEL[q]: {n: vars(s) for n, s in by.items()}
                           for q, by in settings.items()},
              "rows": []}
    lines = ["# Offloaded experts in float32 and in bf16, behind the same link", "",
             f"Command: `{result['command']}` on {result['machine']}, torch threads 1 (the "
             "other core copies experts); model "
             f"{readme}; {args.requests} requests at {args.rate}/s, up to {args.max_output} "
             "new tokens; medians over "
             f"{args.repeats} repeats, every row in each repeat.", "",
             "Link (emulated): "
             f"{calibration['none']['link_bandwidth'] / 1e9:.2f} GB/s for both precisions (a "
             "float32 expert of one layer in one float32 layer's compute). One routed expert, "
             "mean over the routed layers: "
             + ", ".join(f"{statistics.mean(sizes[q]) / 1024:.0f} KiB in {LABEL[q]}"
                         for q in PRECISIONS)
             + f" ({sum(sizes['bf16']) / sum(sizes['none']):.3f}x: bf16 panels, padding "
             "included). Load ratio (one expert into every layer / one "
             "step's compute): " + ", ".join(
                 f"{LABEL[q]} {settings[q][n].load_ratio:.2f} ({n})"
                 for q in PRECISIONS for n in sorted(settings[q])) + ".", "",
             "| cell | system | precision | KiB / expert (mean) | routed experts in fast "
             "memory (MB) | norm. latency (ms) | x resident, same precision | bf16 / float32 | "
             "MB moved / output token | hit ratio | load hidden |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (q, cell, name), reps in runs.items():
        latency = median(reps, "norm_latency_mean_s")
        base = median(runs[q, None, None], "norm_latency_mean_s")
        fp32 = median(runs["none", cell, name], "norm_latency_mean_s")
        row = {"precision": LABEL[q], "cell": None if cell is None else f"{cell[0]}:{cell[1]}",
               "system": name or "resident", "experts_per_layer":
                   None if cell is None else capacity_for(cell[1], experts),
               "expert_bytes_per_layer": sizes[q],
               "norm_latency_mean_s": latency, "x_resident": latency / base,
               "bf16_over_fp32": latency / fp32,
               "per_repeat": [r["norm_latency_mean_s"] for r in reps],
               **{k: median(reps, k) for k in ("bytes_moved", "hit_ratio", "load_hidden",
                                               "fast_tier_bytes", "tokens_per_s")},
               "output_tokens": reps[0]["output_tokens"]}
        result["rows"].append(row)
        lines.append(" | ".join([
            f"| {row['cell'] or 'all resident'}", row["system"], row["precision"],
            f"{statistics.mean(sizes[q]) / 1024:.0f}", f"{row['fast_tier_bytes'] / 1e6:.1f}",
            f"{1e3 * latency:.0f}", f"{row['x_resident']:.2f}x", f"{row['bf16_over_fp32']:.2f}x",
            shown(row["bytes_moved"], 1e-6 / row["output_tokens"], ".2f"),
            shown(row["hit_ratio"], 100, ".1f", "%"), shown(row["load_hidden"], 100, ".0f", "%")])
            + " |")
    write_results(args.out, "offload_precision", result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
