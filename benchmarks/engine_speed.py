"""Decode speed of the serving engine against HF ``generate`` on the same ReadME weights, and
against the machine's limits measured in the same run.

Model: ``--model`` (a ReadME folder); by default the last round of runs/bench/train-readme when
it exists (``benchmarks/train_quality.py`` trains it), else the untrained refactor
runs/bench/moe-readme with a fresh pre-gating router attached (speed does not depend on router
quality beyond how many experts a batch touches), refactored from smollm2-135m over
runs/bench/corpus first if that folder is missing too.

Both sides decode the same equal-length prompts greedily for exactly ``--new-tokens`` tokens
(EOS ignored), after a warm-up. Decode tokens/s = batch * (new - 1) / (time(new) - time(1)),
so prefill is excluded on both sides.

Limits. Matmul floor: the seconds the engine's packed matrix products alone take for one decode
step of the batch (every layer, the shared expert on all rows, the rows split evenly over the
step's measured distinct experts, the LM head); HF's step time over it bounds what any engine
using these kernels can gain here. Roofline tokens/s = batch * bandwidth / bytes read per
decode step (every weight matrix once, the routed experts the engine's decode steps really
touched, and the KV cache at the mean context); bandwidth is a timed sum over a 512 MiB tensor.

``--device`` / ``--dtype`` as every command (default: CUDA bf16 with a GPU, else CPU fp32);
on CUDA every timing synchronises the device before and after.

Writes results/engine_speed.{json,md}.

    .venv/bin/python benchmarks/engine_speed.py [--model DIR] [--batches 1 8 32] [--threads 1 2]
        [--device cuda --dtype bfloat16 --results results/gpu]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

from readmoe.data.corpus import load_corpus
from readmoe.io import write_results
from readmoe.models import load_model, load_tokenizer
from readmoe.models.device import Placement, add_placement_args, placement_from_args
from readmoe.serve.engine import Engine
from readmoe.serve.packed import PackedExpert
from readmoe.serve.sampling import SamplingParams
from readmoe.serve.types import Budget
from readmoe.train.rounds import final_model_dir

TRAINED_RUN = Path("runs/bench/train-readme")
REFACTORED = Path("runs/bench/moe-readme")
CORPUS = Path("runs/bench/corpus")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a ReadME model folder")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, nargs="+", default=None,
                        help="torch thread counts to measure, each for both sides (default: "
                        "torch's own choice); on a shared machine 1 avoids OpenMP stalls")
    parser.add_argument("--repeats", type=int, default=2, help="best of this many timings")
    parser.add_argument("--results", default="results")
    parser.add_argument("--corpus", type=Path, default=CORPUS,
                        help=f"where the prompts come from (default {CORPUS})")
    add_placement_args(parser)
    return parser.parse_args()


def load(spec: str | None, placement: Placement, corpus: Path):
    """(model, tokenizer, description) of the benchmarked ReadME model."""
    where = {"dtype": placement.dtype, "device": placement.device}
    if spec is None and any(TRAINED_RUN.glob("round-*")):
        spec = str(final_model_dir(TRAINED_RUN))
    if spec is not None:
        return load_model(spec, **where), load_tokenizer(spec), spec
    if not REFACTORED.is_dir():
        from readmoe.refactor.pipeline import run_refactor

        run_refactor("smollm2-135m", str(corpus), REFACTORED, placement=placement)
    model = load_model(str(REFACTORED), **where)
    model.attach_router("pregating", seed=0)
    model.to(**where)
    return model, load_tokenizer(str(REFACTORED)), f"{REFACTORED} + untrained pre-gating router"


def prompts(tokenizer, count: int, length: int, corpus_dir: Path) -> list[list[int]]:
    """``count`` prompts of exactly ``length`` tokens, cut from the corpus's documents and
    taken from the domains in turn, so a batch mixes domains (and experts) as real traffic
    does."""
    corpus = load_corpus(corpus_dir)
    per_domain = []
    for domain in corpus.domains:
        windows = []
        for text in corpus.documents(domain)[:16]:
            ids = tokenizer.encode(text)
            windows += [ids[i:i + length] for i in range(0, len(ids) - length, length)][:4]
        per_domain.append(windows)
    out = [w for group in zip(*per_domain, strict=False) for w in group]
    if len(out) < count:
        raise SystemExit("the corpus has too little text for the prompts")
    return out[:count]


def bandwidth_gbs(device: torch.device) -> float:
    """Read bandwidth in GB/s: the best of 5 timed sums over a 512 MiB fp32 tensor."""
    x = torch.ones(128 * 1024 * 1024, device=device)
    x.sum()
    best = min(_timed(x.sum) for _ in range(5))
    return x.numel() * 4 / best / 1e9


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _timed(fn) -> float:
    _sync()
    start = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - start


def hf_time(model, batch: list[list[int]], new: int) -> float:
    ids = torch.tensor(batch, device=model.device)
    with torch.inference_mode():
        return _timed(lambda: model.generate(ids, attention_mask=torch.ones_like(ids),
                                             max_new_tokens=new, min_new_tokens=new,
                                             do_sample=False))


def engine_time(model, tokenizer, batch: list[list[int]], new: int) -> tuple[float, Engine]:
    blocks = len(batch) * -(-(len(batch[0]) + new) // 16)
    engine = Engine(model, tokenizer, "fcfs", Budget(max_tokens=4096, max_seqs=len(batch)),
                    kv_blocks=blocks, block_size=16)
    params = SamplingParams(max_tokens=new, ignore_eos=True)
    return _timed(lambda: engine.generate(batch, params)), engine


@torch.inference_mode()
def matmul_floor(engine: Engine, batch: int, distinct: float, repeats: int) -> float:
    """Seconds of one decode step's packed matrix products alone (module docstring)."""
    runner = engine.runner
    config = engine.model.config
    hidden = config.hidden_size
    experts = max(1, min(batch, round(distinct)))
    rows = [len(part) for part in torch.arange(batch).tensor_split(experts)]
    where = {"dtype": engine.model.dtype, "device": engine.model.device}
    x = torch.randn(batch, hidden, **where)
    attn = torch.randn(batch, runner.heads * runner.head_dim, **where)

    def expert(weights: PackedExpert, inputs: torch.Tensor) -> None:
        gate_up = weights.gate_up(inputs)
        weights.down(gate_up[:, :gate_up.shape[1] // 2])

    def step() -> None:
        for packed in runner.packed:
            packed.qkv(x)
            packed.o(attn)
            if packed.shared is not None:
                expert(packed.shared, x)
            for e, count in enumerate(rows if packed.experts is not None else []):
                expert(packed.experts[e % len(packed.experts)], x[:count])
        runner.lm_head(x)

    step()
    return min(_timed(step) for _ in range(max(3, repeats)))


def step_bytes(model, distinct: float, batch: int, context: float) -> float:
    """Bytes one decode step reads: every weight once (the LM head too, also when it is tied
    to the embedding), ``distinct`` routed experts per layer (the engine's measured mean), and
    the batch's KV cache at ``context`` tokens."""
    config = model.config
    head = model.lm_head.weight
    total = float(head.numel() * head.element_size())
    for name, param in model.named_parameters():
        if ".router." in name or param is head or name.endswith("embed_tokens.weight"):
            continue  # the router is not the backbone; the embedding reads B rows only
        size = param.numel() * param.element_size()
        total += size * distinct / config.num_experts if ".experts." in name else size
    kv_per_token = (2 * config.num_hidden_layers * config.num_key_value_heads
                    * model.model.layers[0].self_attn.head_dim * model.dtype.itemsize)
    return total + batch * context * kv_per_token


def measure(model, tokenizer, pool: list[list[int]], batch_size: int, gbs: float,
            args: argparse.Namespace) -> dict:
    """One row: HF and the engine side by side at ``batch_size``, with the machine's limits."""
    batch = pool[:batch_size]
    hf = (min(hf_time(model, batch, args.new_tokens) for _ in range(args.repeats))
          - min(hf_time(model, batch, 1) for _ in range(args.repeats)))
    runs = [engine_time(model, tokenizer, batch, args.new_tokens) for _ in range(args.repeats)]
    full, engine = min(runs, key=lambda run: run[0])
    eng = full - min(engine_time(model, tokenizer, batch, 1)[0] for _ in range(args.repeats))
    decode_steps = [s for s in engine.steps if s.num_tokens == batch_size]
    distinct = sum(s.distinct_experts for s in decode_steps) / max(1, len(decode_steps))
    tokens = batch_size * (args.new_tokens - 1)
    roof = batch_size * gbs * 1e9 / step_bytes(model, distinct, batch_size,
                                                args.prompt_len + args.new_tokens / 2)
    floor = matmul_floor(engine, batch_size, distinct, args.repeats)
    return {"threads": torch.get_num_threads(), "batch": batch_size,
            "hf_tokens_per_s": tokens / hf, "engine_tokens_per_s": tokens / eng,
            "speedup": hf / eng, "roofline_tokens_per_s": roof,
            "engine_fraction_of_roofline": tokens / eng / roof,
            "matmul_floor_tokens_per_s": batch_size / floor,
            "speedup_bound": hf / (args.new_tokens - 1) / floor,
            "distinct_experts_per_decode_step": distinct}


def main() -> int:
    args = parse_args()
    torch.manual_seed(0)
    placement = placement_from_args(args)
    model, tokenizer, described = load(args.model, placement, args.corpus)
    pool = prompts(tokenizer, max(args.batches), args.prompt_len, args.corpus)
    gbs = bandwidth_gbs(placement.device)
    rows = []
    for threads in args.threads or [torch.get_num_threads()]:
        torch.set_num_threads(threads)
        hf_time(model, pool[:2], 4)  # warm-up
        engine_time(model, tokenizer, pool[:2], 4)
        for b in args.batches:
            rows.append(measure(model, tokenizer, pool, b, gbs, args))
            print(rows[-1], flush=True)
    result = {"command": " ".join([sys.executable, *sys.argv]), "model": described,
              "machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "cpus": os.cpu_count(), "torch": torch.__version__,
                          "gpu": (torch.cuda.get_device_name(placement.device)
                                  if placement.device.type == "cuda" else None)},
              **placement.to_dict(), "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
              "bandwidth_gb_per_s": gbs, "rows": rows}
    lines = ["# Engine decode speed vs HF generate and the machine's limits", "",
             f"Model: {described}; {placement.describe()}; {args.prompt_len}-token prompts, "
             f"{args.new_tokens} new tokens, greedy; measured read bandwidth {gbs:.1f} GB/s.", "",
             f"Command: `{result['command']}`  ", f"Machine: {result['machine']}", "",
             "| threads | batch | HF tok/s | engine tok/s | speedup | matmul floor tok/s | "
             "speedup bound (HF / floor) | roofline tok/s | engine / roofline | "
             "experts per step |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['threads']} | {r['batch']} | {r['hf_tokens_per_s']:.1f} | "
              f"{r['engine_tokens_per_s']:.1f} | {r['speedup']:.2f}x | "
              f"{r['matmul_floor_tokens_per_s']:.1f} | {r['speedup_bound']:.2f}x | "
              f"{r['roofline_tokens_per_s']:.1f} | {r['engine_fraction_of_roofline']:.0%} | "
              f"{r['distinct_experts_per_decode_step']:.2f} |" for r in rows]
    lines += ["", "Speedup bound: HF's decode step time over the matmul floor (the engine's "
              "packed matrix products alone, timed here); no engine built on these kernels "
              "can beat it on this machine. At batch 1 the products stream the weights from "
              "memory; at batch 32 they are compute-bound."]
    write_results(args.results, "engine_speed", result, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
