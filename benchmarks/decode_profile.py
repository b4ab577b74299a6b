"""Where a decode step's time goes: the engine's decode steps under torch's profiler.

Why: the engine decodes below its matmul floor (``engine_speed.py``); what it loses there is
neither matrix products nor attention, so this says how much is small ops, copies and
allocations, and how much is Python outside any operator, before anything is cut.

For each batch size: the engine (FCFS, one thread by default) prefills ``batch`` prompts from
the corpus's domains in turn, then ``--steps`` decode steps run under ``torch.profiler``.
Per step: wall time; the self time of every operator, grouped (matrix products, attention,
everything else by name); and the time in no operator at all (wall less the sum of the
operators' self times: the interpreter, our Python).

Writes results/decode_profile.{json,md}.

    .venv/bin/python benchmarks/decode_profile.py [--model DIR] [--batches 1 8 32]
        [--threads 1] [--steps 20]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from readmoe.io import command_line, write_results
from readmoe.models.device import Placement
from readmoe.serve.engine import Engine
from readmoe.serve.sampling import SamplingParams
from readmoe.serve.types import Budget

sys.path.insert(0, str(Path(__file__).parent))
from engine_speed import CORPUS, load, prompts  # noqa: E402

MATMUL = {"aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear",
          "mkldnn::_linear_pointwise", "readmoe::panel_linear"}
ATTENTION = {"aten::_scaled_dot_product_flash_attention_for_cpu",
             "aten::_scaled_dot_product_attention_math", "aten::scaled_dot_product_attention",
             "aten::_scaled_dot_product_efficient_attention", "readmoe::decode_attention"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a ReadME model folder (default: as "
                        "engine_speed.py)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--corpus", type=Path, default=CORPUS,
                        help=f"where the prompts come from (default {CORPUS})")
    parser.add_argument("--top", type=int, default=12, help="operators listed per batch")
    parser.add_argument("--results", default="results")
    return parser.parse_args()


def group(name: str) -> str:
    if name in MATMUL:
        return "matrix products"
    if name in ATTENTION:
        return "attention"
    return name


@torch.inference_mode()
def profile_batch(model, tokenizer, batch: list[list[int]], steps: int, top: int) -> dict:
    blocks = len(batch) * -(-(len(batch[0]) + steps + 4) // 16)
    engine = Engine(model, tokenizer, "fcfs", Budget(max_tokens=4096, max_seqs=len(batch)),
                    kv_blocks=blocks, block_size=16)
    for prompt in batch:
        engine.add_request(prompt, SamplingParams(max_tokens=steps + 4, ignore_eos=True))
    for _ in range(3):  # the prefill, then two decode steps of warm-up
        engine.step()
    unprofiled = []
    for _ in range(2):
        started = time.perf_counter()
        engine.step()
        unprofiled.append(time.perf_counter() - started)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        started = time.perf_counter()
        for _ in range(steps - 2):
            engine.step()
        wall = (time.perf_counter() - started) / (steps - 2)
    per_group: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    for event in prof.key_averages():
        per_group[group(event.key)] += event.self_cpu_time_total / 1e6 / (steps - 2)
        calls[group(event.key)] += event.count // (steps - 2)
    in_ops = sum(per_group.values())
    ranked = sorted(per_group.items(), key=lambda kv: -kv[1])
    rows = [{"name": name, "ms_per_step": 1e3 * seconds, "share": seconds / wall,
             "calls_per_step": calls[name]} for name, seconds in ranked[:top]]
    rest = sum(seconds for _, seconds in ranked[top:])
    return {"batch": len(batch), "wall_ms_per_step": 1e3 * wall,
            "unprofiled_ms_per_step": 1e3 * min(unprofiled),
            "operators_ms_per_step": 1e3 * in_ops,
            "outside_operators_ms_per_step": 1e3 * (wall - in_ops),
            "operator_calls_per_step": sum(calls.values()),
            "top": rows, "other_operators_ms_per_step": 1e3 * rest}


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer, described, _ = load(args.model, Placement(torch.device("cpu"),
                                                                 torch.float32), args.corpus)
    pool = prompts(tokenizer, max(args.batches), args.prompt_len, args.corpus)
    runs = [profile_batch(model, tokenizer, pool[:b], args.steps, args.top)
            for b in args.batches]
    result = {"command": command_line(),
              "machine": f"{platform.machine()}, threads {args.threads}, fp32",
              "model": described, "runs": runs}
    write_results(Path(args.results), "decode_profile", result, markdown(result))
    return 0


def markdown(result: dict) -> str:
    lines = ["# Where a decode step's time goes (torch profiler)", "",
             f"Command: `{result['command']}` on {result['machine']}; model {result['model']}.",
             "", "| batch | step wall (ms) | unprofiled (ms) | in operators (ms) | outside any "
             "operator (ms) | operator calls / step |", "|---:|---:|---:|---:|---:|---:|"]
    for run in result["runs"]:
        lines.append(f"| {run['batch']} | {run['wall_ms_per_step']:.2f} | "
                     f"{run['unprofiled_ms_per_step']:.2f} | {run['operators_ms_per_step']:.2f} "
                     f"| {run['outside_operators_ms_per_step']:.2f} | "
                     f"{run['operator_calls_per_step']} |")
    for run in result["runs"]:
        lines += ["", f"### batch {run['batch']}: self time per step", "",
                  "| operator | ms / step | share of the step | calls / step |",
                  "|---|---:|---:|---:|"]
        lines += [f"| {r['name']} | {r['ms_per_step']:.2f} | {100 * r['share']:.0f}% | "
                  f"{r['calls_per_step']} |" for r in run["top"]]
        lines.append(f"| every other operator | {run['other_operators_ms_per_step']:.2f} | "
                     f"{100 * run['other_operators_ms_per_step'] / run['wall_ms_per_step']:.0f}%"
                     " | |")
    lines += ["", "Profiling adds its own cost per operator: compare 'step wall' with "
              "'unprofiled'. 'Outside any operator' is the step's wall time less every "
              "operator's self time: the interpreter running the engine's Python.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
