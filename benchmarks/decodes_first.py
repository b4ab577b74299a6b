"""Does the cache-aware scheduler's decodes-first order pay? ``readme-codesign`` with and
without it (``--no-decodes-first``), paired by repeat, on the engine cells of
``benchmarks/codesign.py``.

Why: decodes first is a latency argument (a decode that waits a step costs its request a whole
step, a prompt token a fraction of one), so it is judged by normalized latency and by the
steps requests wait, each pair run next to each other so the shared machine's drift cancels in
their ratio; a difference is called only when the exact sign test says so (p < 0.05).

Needs ``make demo`` first (its trained ReadME model and corpus). Writes
results/decodes_first.{json,md}.

    .venv/bin/python benchmarks/decodes_first.py [--repeats 6] [--cells link:0.5 ram:1.0]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
from dataclasses import replace

import torch
from codesign import ENGINE_BUDGET, add_engine_cell_args, engine_cell_inputs, summarize_run
from tqdm import tqdm

from readmoe.eval.significance import sign_test
from readmoe.io import command_line, write_results
from readmoe.serve.placement import routed_expert_bytes
from readmoe.serve.systems import calibrate, capacity_for, make_settings, make_system, run_engine


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_engine_cell_args(parser, ["link:0.5", "ram:1.0"])
    parser.add_argument("--repeats", type=int, default=6)
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    torch.set_num_threads(1)
    readme, tokenizer, resident, offloaded, specs = engine_cell_inputs(args)
    cal = calibrate(resident, tokenizer, readme, specs, ENGINE_BUDGET)
    settings = make_settings(cal, sorted({c.split(":")[0] for c in args.cells}))
    routed = routed_expert_bytes(resident)
    runs: dict[str, dict[bool, list[dict]]] = {c: {True: [], False: []} for c in args.cells}
    progress = tqdm(total=args.repeats * len(args.cells) * 2, desc="engine runs")
    for repeat in range(args.repeats):
        for cell in args.cells:
            name, share = cell.split(":")
            share, setting = float(share), settings[name]
            slots = capacity_for(share, resident.config.num_experts)
            system = make_system("readme-codesign", setting, "mode-5", slots,
                                 resident.config.num_experts)
            for first in (True, False) if repeat % 2 == 0 else (False, True):
                variant = replace(system, scheduler_options={**system.scheduler_options,
                                                             "decodes_first": first})
                metrics = run_engine(variant, offloaded, tokenizer, str(readme), specs=specs,
                                     share=share, setting=setting, routed_bytes=routed,
                                     budget=ENGINE_BUDGET, kv_blocks=2048)
                runs[cell][first].append(summarize_run(metrics, slots))
                progress.update()
    progress.close()
    result = {"command": command_line(),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "threads": 1,
              "model": str(readme), "calibration": cal, "cells": {}}
    lines = ["# The cache-aware scheduler's decodes-first order, paired by repeat", "",
             f"Command: `{result['command']}` on {result['machine']}, torch threads 1; "
             "`readme-codesign` of benchmarks/codesign.py, synthetic workload; on / off of a "
             "repeat run next to each other (their order alternates).", "",
             "| cell | norm. latency on / off (ms, median) | ratios on / off, per repeat | "
             "sign test p | steps waited per request on / off | hit ratio on / off |",
             "|---|---:|---|---:|---:|---:|"]
    for cell, pair in runs.items():
        on, off = pair[True], pair[False]
        ratios = [a["norm_latency_mean_s"] / b["norm_latency_mean_s"]
                  for a, b in zip(on, off, strict=True)]
        row = {key: {label: statistics.median(r[key] for r in rows)
                     for label, rows in (("on", on), ("off", off))}
               for key in ("norm_latency_mean_s", "waited_steps_per_request", "hit_ratio")}
        row.update(ratios=ratios, sign_test_p=sign_test([r - 1 for r in ratios]),
                   per_repeat={"on": [r["norm_latency_mean_s"] for r in on],
                               "off": [r["norm_latency_mean_s"] for r in off]})
        result["cells"][cell] = row
        lat, wait, hit = (row[k] for k in ("norm_latency_mean_s", "waited_steps_per_request",
                                           "hit_ratio"))
        lines.append(f"| {cell} | {1e3 * lat['on']:.0f} / {1e3 * lat['off']:.0f} | "
                     f"{', '.join(f'{r:.2f}' for r in ratios)} | {row['sign_test_p']:.3f} | "
                     f"{wait['on']:.2f} / {wait['off']:.2f} | {100 * hit['on']:.0f}% / "
                     f"{100 * hit['off']:.0f}% |")
    write_results(args.out, "decodes_first", result, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
