"""How many kernels a GPU decode step launches: the ops of the step CUDA graphs replay, and of
the pre-gating router's step beside it, counted on the CPU.

Why: on a GPU a decode step of a model this small waits on its kernels one after another, not
on bytes (the H100 run of ``gpu_check.py``: 2-4% of the bandwidth roofline, the ReadME twin at
0.5-0.63x the dense one). Each op that is not a view is one kernel there, so the count says
what a change to the step (fusing ops, graphing the router) buys before a GPU is lent to time
it. The step is the one ``serve/graphs.py`` captures (``StaticDecode``, run directly, as the
tests do), with the fused CPU ops off as on a GPU; the router's step is ``PagedRouter.step``'s
torch path, which a GPU runs eagerly. Ops are counted at the dispatcher
(``TorchDispatchMode``): what a kernel launch would be, composite ops already decomposed.

Writes results/step_ops.{json,md}.

    .venv/bin/python benchmarks/step_ops.py [--model DIR] [--dense DIR] [--rows 1 8 32]
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # prefilled_step lives beside the tests

from readmoe.io import command_line, write_results  # noqa: E402
from readmoe.models import load_model  # noqa: E402
from readmoe.serve import cpu_ops  # noqa: E402
from readmoe.serve.graphs import GraphedDecode  # noqa: E402
from readmoe.serve.kv_cache import PagedKVCache  # noqa: E402
from readmoe.serve.router_step import PagedRouter  # noqa: E402
from readmoe.serve.runner import ModelRunner  # noqa: E402
from tests.serve.test_engine import prefilled_step  # noqa: E402

PROMPT = 12  # tokens a row holds before the counted step


class OpCount(TorchDispatchMode):
    """Every op dispatched inside, views left out (they launch no kernel)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


@torch.no_grad()
def count_step(folder: str, rows: int) -> dict:
    """Ops of one graphed decode step of ``rows`` rows, and of the router's step if any."""
    model = load_model(folder)
    config = model.config
    blocks = rows * -(-(PROMPT + 1) // 4) + 1
    kv = PagedKVCache(config.num_hidden_layers, blocks, 4, config.num_key_value_heads,
                      config.hidden_size // config.num_attention_heads)
    runner = ModelRunner(model, kv, fused=False)
    seqs = [list(range(10 + r, 10 + r + PROMPT)) for r in range(rows)]
    experts = [r % config.num_experts for r in range(rows)] if runner._routed else None
    step = prefilled_step(runner, seqs, [[0] * PROMPT] * rows if experts is not None else None)
    runner.graphs = GraphedDecode(runner, max_rows=rows, max_len=64, capture=False)
    runner.forward(step, experts)  # warm, and the graph's inputs in place
    with OpCount() as whole:
        runner.forward(step, experts)
    with torch.inference_mode(), OpCount() as graphed:  # what the graph holds: the step on
        runner.graphs._run(rows, 64, experts is None)  # its fixed-shape inputs, as forward
    result = {"model": folder, "rows": rows, "layers": config.num_hidden_layers,
              "graphed_ops": sum(graphed.ops.values()), "graphed_by_op": dict(graphed.ops),
              "host_ops": sum(whole.ops.values()) - sum(graphed.ops.values())}
    if getattr(model.model, "router", None) is not None:
        router = PagedRouter(model, kv.spare_slot + 1)
        slots = [kv.slots(str(r), 0, PROMPT) for r in range(rows)]
        tokens, previous = [s[-1] for s in seqs], [-1] * rows
        router.step(tokens, slots, previous)
        with OpCount() as eager:
            router.step(tokens, slots, previous)
        result |= {"router_ops": sum(eager.ops.values()), "router_by_op": dict(eager.ops)}
    return result


def markdown(result: dict) -> str:
    lines = ["# Kernels a GPU decode step launches (ops counted on the CPU)", "",
             f"Command: `{result['command']}`. Ops dispatched by one decode step as "
             "`serve/graphs.py` captures it (`StaticDecode`, fused CPU ops off), views left "
             "out: on a GPU each is a kernel replayed from the graph. The router's step runs "
             "eagerly beside it (`PagedRouter.step`), each op a launch from Python.", "",
             "| model | rows | layers | ops in the graph | per layer | host ops around it | "
             "router step ops (eager) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["counts"]:
        lines.append(f"| {r['model']} | {r['rows']} | {r['layers']} | {r['graphed_ops']} | "
                     f"{r['graphed_ops'] / r['layers']:.1f} | {r['host_ops']} | "
                     f"{r.get('router_ops', '')} |")
    lines += ["", "Host ops: the step's inputs built and copied in (CPU tensors on a GPU "
              "machine, two copies to the device) and its logits sliced; the router's step "
              "ends by copying each row's expert back to the host (a synchronisation)."]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="runs/demo/train-readme/round-1",
                        help="a ReadME model folder")
    parser.add_argument("--dense", default="runs/bench/dense-experts",
                        help="the dense model as a one-expert ReadME folder (engine_speed.py "
                        "writes it)")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--results", default="results")
    args = parser.parse_args()
    os.environ[cpu_ops.DISABLE] = "0"  # a GPU has no fused CPU ops: count the torch path
    for folder in (args.model, args.dense):
        if not Path(folder).is_dir():
            raise SystemExit(f"{folder} is not a folder: run `make demo` (the ReadME model) "
                             "and benchmarks/engine_speed.py (the dense one) first, or pass "
                             "--model / --dense")
    counts = [count_step(folder, rows) for folder in (args.model, args.dense)
              for rows in args.rows]
    result = {"command": command_line(), "counts": counts}
    write_results(args.results, "step_ops", result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
