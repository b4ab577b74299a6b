"""readmoe's engine vs vLLM (the ReadME plugin) on the same folder and workload, in one run.

Both sides serve the same ReadME folder on the CPU in fp32, every expert resident, with the
same batching limits (32 sequences, 256 tokens a step), in one process each, one after the
other (never competing for the cores):

- decode speed at batch 1, 8 and 32: equal-length prompts cut from the corpus, exactly
  ``--new-tokens`` greedy tokens (EOS ignored); decode tokens/s = batch * (new - 1) /
  (time(new) - time(1)), so prefill is excluded (engine_speed.py's method), best of
  ``--repeats``. The greedy outputs of the two sides are compared token for token.
- the Chatbot-Arena-like workload: ``--requests`` synthetic requests arriving at ``--rate``
  per second (outputs capped at ``--max-output``, EOS ignored), replayed at their arrival times;
  TTFT / TPOT / end-to-end / normalized latency percentiles by ``serve.metrics.aggregate``
  from each request's arrival and token times.

readmoe's side runs here (the main environment, .venv); vLLM's runs this same file with
``--vllm-side JOB OUT`` under .venv-vllm's python (vLLM pins an older transformers than
readmoe.model needs), with its engine core in that process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``:
one engine step per ``step()`` call, as readmoe's engine is driven) and, unless ``--eager``,
vLLM's default CPU compilation (TorchDynamo + inductor, compiled once at start-up).

Writes results/vllm_parity.{json,md}.

    .venv/bin/python benchmarks/vllm_parity.py [--model DIR] [--corpus DIR]
        [--vllm-python .venv-vllm/bin/python] [--batches 1 8 32] [--eager]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

DEMO_RUN = Path("runs/demo/train-readme")
DEMO_CORPUS = Path("runs/demo/corpus")
MAX_SEQS, MAX_BATCH_TOKENS = 32, 256
KV_CACHE_BYTES = 1 << 30  # vLLM's explicit KV cache: ~22k tokens of the default model, fp32
Generate = Callable[[Sequence[Sequence[int]], int], list[list[int]]]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None,
                        help=f"a trained ReadME folder (default: last round of {DEMO_RUN})")
    parser.add_argument("--corpus", default=str(DEMO_CORPUS))
    parser.add_argument("--vllm-python", default=".venv-vllm/bin/python")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="best of this many timings")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--rate", type=float, default=1.0, help="arrivals per second")
    parser.add_argument("--max-output", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eager", action="store_true", help="vLLM without compilation")
    parser.add_argument("--results", default="results")
    parser.add_argument("--vllm-side", nargs=2, metavar=("JOB", "OUT"), help=argparse.SUPPRESS)
    return parser.parse_args()


def decode_speed(generate: Generate, prompts: list[list[int]], new_tokens: int,
                 repeats: int) -> tuple[float, list[list[int]]]:
    """(decode tokens/s, the greedy outputs) of ``generate`` on ``prompts``, either side."""
    def best(max_tokens: int) -> tuple[float, list[list[int]]]:
        timings = []
        for _ in range(repeats):
            started = time.perf_counter()
            outputs = generate(prompts, max_tokens)
            timings.append(time.perf_counter() - started)
        return min(timings), outputs

    first, _ = best(1)
    full, outputs = best(new_tokens)
    return len(prompts) * (new_tokens - 1) / (full - first), outputs


def run_side(generate: Generate, replay: Callable[[list[dict]], dict], job: dict) -> dict:
    """Both measurements of one side (the same code on both): speeds, outputs, workload."""
    generate(next(iter(job["decode"].values()))[:1], 4)  # warm-up
    decode = {}
    for batch, prompts in job["decode"].items():
        speed, outputs = decode_speed(generate, prompts, job["new_tokens"], job["repeats"])
        decode[batch] = {"tokens_per_s": speed, "outputs": outputs}
        print(f"batch {batch}: {speed:.1f} decode tokens/s", flush=True)
    return {"decode": decode, "workload": replay(job["workload"])}


def vllm_side(job_path: str, out_path: str) -> None:
    """vLLM's measurements (run under .venv-vllm's python)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    job = json.loads(Path(job_path).read_text())
    started = time.perf_counter()
    llm = LLM(model=job["model"], dtype="float32", enforce_eager=job["eager"], seed=0,
              kv_cache_memory_bytes=KV_CACHE_BYTES, max_num_seqs=MAX_SEQS,
              max_num_batched_tokens=MAX_BATCH_TOKENS, max_model_len=4096,
              hf_overrides={"router_hysteresis": job["router_hysteresis"]})
    startup_s = time.perf_counter() - started

    def params(max_tokens: int) -> SamplingParams:
        return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)

    def generate(prompts, max_tokens):
        outputs = llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts],
                               params(max_tokens), use_tqdm=False)
        return [list(out.outputs[0].token_ids) for out in outputs]

    def replay(specs: list[dict]) -> dict:
        engine, specs_of, times = llm.llm_engine, {}, {}
        pending = sorted(specs, key=lambda s: s["arrival_time"])
        base = time.perf_counter()
        while pending or engine.has_unfinished_requests():
            while pending and pending[0]["arrival_time"] <= time.perf_counter() - base:
                spec = pending.pop(0)
                prompt = TokensPrompt(prompt_token_ids=spec["prompt"])
                # outputs carry the id given here; add_request returns an internal one
                # (the id plus a random suffix)
                engine.add_request(spec["id"], prompt, params(spec["max_tokens"]))
                specs_of[spec["id"]] = spec
                times[spec["id"]] = []
            if engine.has_unfinished_requests():
                for out in engine.step():
                    spec = specs_of[out.request_id]
                    seen = times[spec["id"]]
                    now = time.perf_counter() - base - spec["arrival_time"]
                    seen += [now] * (len(out.outputs[0].token_ids) - len(seen))
            elif pending:
                time.sleep(max(0.0, pending[0]["arrival_time"] - (time.perf_counter() - base)))
        return times

    result = run_side(generate, replay, job)
    result.update(startup_s=startup_s, torch_threads=torch.get_num_threads(),
                  compilation=("eager" if job["eager"] else
                               str(llm.llm_engine.vllm_config.compilation_config.mode)))
    Path(out_path).write_text(json.dumps(result))


def readmoe_side(job: dict) -> dict:
    import torch

    from readmoe.models import load_model, load_tokenizer
    from readmoe.serve.engine import Engine
    from readmoe.serve.sampling import SamplingParams
    from readmoe.serve.types import Budget
    from readmoe.serve.workload import Prompt, RequestSpec

    model, tokenizer = load_model(job["model"]), load_tokenizer(job["model"])
    model.config.router_hysteresis = job["router_hysteresis"]
    engine = Engine(model, tokenizer, budget=Budget(MAX_BATCH_TOKENS, MAX_SEQS))

    def generate(prompts, max_tokens):
        outputs = engine.generate(prompts, SamplingParams(max_tokens=max_tokens,
                                                          ignore_eos=True))
        return [out.token_ids for out in outputs]

    def replay(specs: list[dict]) -> dict:
        work = [RequestSpec(s["id"], s["arrival_time"], Prompt(len(s["prompt"]),
                                                                tokens=tuple(s["prompt"])),
                            s["max_tokens"]) for s in specs]
        # a fresh engine: the decode runs' auto-numbered request ids would clash with the specs'
        fresh = Engine(model, tokenizer, budget=Budget(MAX_BATCH_TOKENS, MAX_SEQS))
        fresh.run_workload(work)
        return {r.request_id: [t - r.arrival_time for t in r.output_times]
                for r in fresh.queue.finished}

    result = run_side(generate, replay, job)
    result["torch_threads"] = torch.get_num_threads()
    return result


def latency(job: dict, side: dict) -> dict:
    """``serve.metrics.aggregate`` over one side's replay: each request's token times, from
    its arrival, on the workload's clock."""
    from readmoe.serve.metrics import aggregate
    from readmoe.serve.types import Request

    requests = []
    for spec in job["workload"]:
        request = Request(spec["id"], spec["arrival_time"], [0] * len(spec["prompt"]),
                          spec["max_tokens"])
        request.output_times = [spec["arrival_time"] + t for t in side["workload"][spec["id"]]]
        requests.append(request)
    return aggregate(requests, [])


def make_job(args: argparse.Namespace, model: str) -> dict:
    import random

    from readmoe.cli.bench_cmds import corpus_prompts, workload_specs
    from readmoe.models import load_tokenizer

    tokenizer = load_tokenizer(model)
    provide, rng = corpus_prompts(tokenizer, args.corpus), random.Random(args.seed)
    decode = {str(batch): [list(provide(args.prompt_len, rng).tokens) for _ in range(batch)]
              for batch in args.batches}
    specs = workload_specs(tokenizer, args.corpus, None, requests=args.requests,
                           rate=args.rate, seed=args.seed, max_output=args.max_output)
    workload = [{"id": s.request_id, "arrival_time": s.arrival_time,
                 "prompt": list(s.prompt.tokens), "max_tokens": s.max_tokens} for s in specs]
    return {"model": model, "decode": decode, "new_tokens": args.new_tokens,
            "repeats": args.repeats, "workload": workload, "eager": args.eager,
            # vLLM routes token by token: both sides serve the folder without its hysteresis
            "router_hysteresis": 0.0}


def markdown(result: dict) -> str:
    sides = ("readmoe", "vllm")
    lines = ["# readmoe's engine vs vLLM with the ReadME plugin", "",
             f"Model: {result['model']}; CPU fp32, every expert resident, at most {MAX_SEQS} "
             f"sequences and {MAX_BATCH_TOKENS} tokens a step on both sides; torch threads: "
             f"readmoe {result['readmoe']['torch_threads']}, vLLM "
             f"{result['vllm']['torch_threads']}; vLLM compilation: "
             f"{result['vllm']['compilation']} (start-up {result['vllm']['startup_s']:.0f} s)."
             "  ", f"Command: `{result['command']}`  ", f"Machine: {result['machine']}", "",
             f"## Decode tokens/s ({result['prompt_len']}-token prompts, "
             f"{result['new_tokens']} new tokens, greedy, best of {result['repeats']})", "",
             "| batch | readmoe tok/s | vLLM tok/s | vLLM / readmoe | outputs equal |",
             "|---:|---:|---:|---:|---:|"]
    for batch, row in result["decode"].items():
        lines.append(f"| {batch} | {row['readmoe']:.1f} | {row['vllm']:.1f} | "
                     f"{row['vllm'] / row['readmoe']:.2f}x | {row['equal']} |")
    work = result["workload"]
    lines += ["", f"## Arena-like workload ({work['requests']} requests at {work['rate']:g}/s, "
              f"outputs <= {work['max_output']} tokens, EOS ignored)", "",
              "| side | tokens/s | TTFT p50 (s) | TTFT p95 (s) | TPOT mean (ms) | "
              "normalized p50 (ms/token) | normalized p95 (ms/token) | e2e p95 (s) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for side in sides:
        m = work[side]
        lines.append(
            f"| {side} | {m['throughput_tokens_per_s']:.1f} | {m['ttft_s']['p50']:.3f} | "
            f"{m['ttft_s']['p95']:.3f} | {1e3 * m['tpot_s']['mean']:.0f} | "
            f"{1e3 * m['normalized_latency_s']['p50']:.0f} | "
            f"{1e3 * m['normalized_latency_s']['p95']:.0f} | {m['e2e_s']['p95']:.2f} |")
    return "\n".join(lines)


def main() -> int:
    args = parse_args()
    if args.vllm_side:
        vllm_side(*args.vllm_side)
        return 0
    from readmoe.io import command_line, write_results
    from readmoe.train.rounds import final_model_dir

    model = str(Path(args.model or final_model_dir(DEMO_RUN)).resolve())
    job = make_job(args, model)
    load_before = os.getloadavg()[0]
    ours = readmoe_side(job)
    with tempfile.TemporaryDirectory() as tmp:
        job_path, out_path = Path(tmp) / "job.json", Path(tmp) / "vllm.json"
        job_path.write_text(json.dumps(job))
        subprocess.run([args.vllm_python, __file__, "--vllm-side", str(job_path),
                        str(out_path)], check=True)
        theirs = json.loads(out_path.read_text())
    decode = {}
    for batch in job["decode"]:
        a, b = ours["decode"][batch], theirs["decode"][batch]
        equal = sum(x == y for x, y in zip(a["outputs"], b["outputs"], strict=True))
        decode[batch] = {"readmoe": a["tokens_per_s"], "vllm": b["tokens_per_s"],
                         "equal": f"{equal} / {len(a['outputs'])}"}
    result = {
        "command": command_line(), "model": model,
        "machine": f"{platform.platform()}, {os.cpu_count()} CPUs, load average before / "
                   f"after {load_before:.2f} / {os.getloadavg()[0]:.2f}",
        "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats,
        "decode": decode,
        "workload": {"requests": args.requests, "rate": args.rate, "max_output": args.max_output,
                     "seed": args.seed, "readmoe": latency(job, ours),
                     "vllm": latency(job, theirs)},
        "readmoe": {"torch_threads": ours["torch_threads"]},
        "vllm": {key: theirs[key] for key in ("torch_threads", "compilation", "startup_s")},
    }
    write_results(args.results, "vllm_parity", result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
