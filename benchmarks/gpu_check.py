"""The GPU path in one go, on a machine with CUDA: what a CPU-only session can only write.

Checks (each recorded as pass / fail with its numbers; one failing does not stop the rest):

1. ``placement``: with a GPU, the default placement is CUDA bf16.
2. ``engine``: a tiny ReadME model served on CUDA in fp32 gives the CPU's greedy tokens;
   in bf16 every request finishes. ``graphs``: its decode steps and its router's steps
   replayed from CUDA graphs (``serve/graphs.py``, ``serve/router_graphs.py``) give the eager
   steps' tokens (``--enforce-eager``), graphs of both captured.
3. ``cuda_store``: the CUDA expert store (``--capacity``): RAM tier in pinned host memory,
   copies on a side stream with prefetch, and the file tier, each giving the resident
   model's greedy tokens; bf16 from the RAM tier finishes; misses and hidden load time.
4. ``server``: `readmoe serve --device cuda` answers a streamed chat through the official
   openai client and exits 0 on SIGTERM.
5. ``train``: `readmoe stats/refactor/train --device cuda` (bf16 autocast) on a tiny model:
   fp32 weights saved, finite losses.
6. ``engine_speed``: ``benchmarks/engine_speed.py --device cuda`` in bf16 and fp32, on
   ``--model`` / ``--corpus`` when given (or found under runs/), else on a random-weight twin
   of the refactored SmolLM2-135M's shape (speed does not depend on the weights' values; the
   untrained router spreads tokens over more experts than a trained one), labelled so.

Writes results/gpu_check.{json,md} (and results/gpu/{bfloat16,float32}/engine_speed.*). Run
from the repository root (``--device cpu`` is a dry run of the same checks, results
elsewhere):

    python benchmarks/gpu_check.py [--model DIR --corpus DIR]
    python benchmarks/gpu_check.py --device cpu --results /tmp/gpu-dry --speed-args \
        --batches 1 --new-tokens 4 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the tiny-model helpers live beside the tests

from readmoe.io import atomic_write_json, command_line, write_results  # noqa: E402
from readmoe.models.device import resolve_placement  # noqa: E402
from readmoe.serve.launch import EngineOptions, open_engine  # noqa: E402
from readmoe.serve.sampling import SamplingParams  # noqa: E402

PROMPTS = [[5, 9, 14, 3, 70], [40, 41, 42, 43, 44, 45, 46], list(range(20, 60))]
VERDICT = {True: "pass", False: "FAIL", None: "missing"}  # missing: nothing there to check
FOUND = [("runs/bench/train-readme", "runs/bench/corpus"),
         ("runs/demo/train-readme", "runs/demo/corpus")]


def greedy(folder: Path, options: EngineOptions, device: str, dtype: str = "float32") -> dict:
    """Greedy tokens of PROMPTS and what the engine's store says about itself."""
    with open_engine(str(folder), options, resolve_placement(device, dtype)) as served:
        outs = served.engine.generate(PROMPTS, SamplingParams(max_tokens=8))
        graphs = served.engine.runner.graphs
        router = served.engine.router
        router_graphs = None if router is None else router.graphs
        run = {"tokens": [o.token_ids for o in outs], "store": served.experts["store"],
               "graphs": 0 if graphs is None else graphs.captured,
               "router_graphs": 0 if router_graphs is None else router_graphs.captured}
        store = served.engine.store
        if store is not None:
            run["stats"] = store.stats.to_dict()
            if options.tier == "ram":  # --tier ram on CUDA promises DMA from pinned memory
                parts = next(iter(store._tier._experts.values()))  # a layer's packed experts
                run["pinned"] = all(t.is_pinned() for t in parts)
        return run


def check_placement(device: str) -> dict:
    placement = resolve_placement()
    expected = {"device": "cuda", "dtype": "bfloat16"} if device == "cuda" else {
        "device": "cpu", "dtype": "float32"}
    return {"ok": placement.to_dict() == expected, "default": placement.to_dict(),
            "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None}


def check_engine(folder: Path, device: str) -> dict:
    cpu = greedy(folder, EngineOptions(), "cpu")["tokens"]
    here = greedy(folder, EngineOptions(), device)["tokens"]
    bf16 = greedy(folder, EngineOptions(), device, "bfloat16")["tokens"]
    same = sum(a == b for x, y in zip(cpu, here, strict=True) for a, b in zip(x, y, strict=False))
    return {"ok": here == cpu and all(len(t) == 8 for t in bf16),
            "tokens_equal": f"{same} of {sum(map(len, cpu))}"}


def check_graphs(folder: Path, device: str) -> dict:
    """Decode steps replayed from CUDA graphs, the router's steps too, give the eager
    steps' greedy tokens (fp32)."""
    graphs = greedy(folder, EngineOptions(), device)
    eager = greedy(folder, EngineOptions(cuda_graphs=False), device)
    cuda = device == "cuda"
    return {"ok": graphs["tokens"] == eager["tokens"] and eager["graphs"] == 0
            and eager["router_graphs"] == 0 and (graphs["graphs"] > 0) == cuda
            and (graphs["router_graphs"] > 0) == cuda, "captured": graphs["graphs"],
            "router_captured": graphs["router_graphs"]}


def check_store(folder: Path, device: str) -> dict:
    resident = greedy(folder, EngineOptions(), device)["tokens"]
    result = {}
    for tier in ("ram", "file"):
        run = greedy(folder, EngineOptions(capacity=1, tier=tier, cache_policy="lru"), device)
        result[tier] = {**run, "equal": run.pop("tokens") == resident}
    bf16 = greedy(folder, EngineOptions(capacity=1, tier="ram"), device, "bfloat16")
    result["bf16_ram_finishes"] = all(len(t) == 8 for t in bf16["tokens"])
    result["ok"] = (all(result[t]["equal"] and result[t]["stats"]["misses"] > 0
                        for t in ("ram", "file")) and result["bf16_ram_finishes"]
                    and result["ram"]["pinned"] == (device == "cuda"))
    return result


def check_server(folder: Path, device: str) -> dict:
    from openai import OpenAI

    from readmoe.server.process import ServerProcess

    with ServerProcess(folder, "--device", device, "--served-model-name", "tiny") as server:
        with OpenAI(base_url=server.base_url, api_key="none", max_retries=0) as client:
            chunks = list(client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                temperature=0, stream=True, stream_options={"include_usage": True}))
        status = server.stop()
    listening = next(line for line in server.output if "listening on" in line)
    return {"ok": status == 0 and chunks[-1].usage.completion_tokens > 0
            and device in listening, "exit_status": status, "listening": listening.strip(),
            "events": len(chunks)}


def check_train(work: Path, device: str) -> dict:
    from safetensors.torch import load_file

    from readmoe.cli import main
    from tests.conftest import char_tokenizer, refactor_tiny, tiny_model, write_alphabet_corpus

    dense = work / "dense"
    tiny_model().save_pretrained(dense)
    char_tokenizer().save_pretrained(dense)
    corpus = write_alphabet_corpus(work / "corpus", docs=12, length=400)
    moe = refactor_tiny(work, dense, corpus)
    out = work / "train"
    status = main(["train", str(moe), "--corpus", str(corpus), "--out", str(out), "--rounds",
                   "1", "--router-steps", "3", "--expert-steps", "3", "--batch-size", "4",
                   "--block-size", "32", "--eval-tokens", "64", "--device", device,
                   "--dtype", "bfloat16"])
    dtypes = {str(t.dtype) for t in load_file(str(out / "round-0" / "model.safetensors"))
              .values()}
    log = json.loads((out / "train_log.json").read_text())["rounds"][0]
    losses = log["router"]["losses"] + log["experts"]["losses"]
    return {"ok": status == 0 and dtypes == {"torch.float32"}
            and all(loss == loss for loss in losses), "weights": sorted(dtypes),
            "losses": losses}


TWIN_SHAPE = {"vocab_size": 49152, "hidden_size": 576, "num_hidden_layers": 30,
              "num_attention_heads": 9, "num_key_value_heads": 3,
              "tie_word_embeddings": True, "max_position_embeddings": 8192}


def speed_twins(work: Path) -> tuple[Path, Path, Path, str]:
    """Random-weight twins of SmolLM2-135M (dense) and of its refactored ReadME model, and a
    corpus: what a device machine without the built-in model measures speed on (speed does not
    depend on the weights' values; the untrained router spreads tokens over more experts than
    a trained one)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from readmoe.model import ReadMEConfig, ReadMEForCausalLM
    from readmoe.refactor.slicing import save_readme
    from tests.conftest import char_tokenizer, write_alphabet_corpus

    torch.manual_seed(0)
    dense = work / "dense-twin"
    LlamaForCausalLM(LlamaConfig(intermediate_size=1536, **TWIN_SHAPE)).eval().save_pretrained(
        dense)
    char_tokenizer().save_pretrained(dense)
    layers = TWIN_SHAPE["num_hidden_layers"]
    config = ReadMEConfig(dense_intermediate_size=1536, num_experts=6,
                          shared_intermediate_sizes=[318] * layers,
                          expert_intermediate_sizes=[450] * layers, **TWIN_SHAPE)
    model = ReadMEForCausalLM(config).eval()
    model.attach_router("pregating", seed=0)
    folder = save_readme(model, work / "twin", tokenizer=char_tokenizer())
    corpus = write_alphabet_corpus(work / "twin-corpus", docs=40, length=4000)
    return folder, dense, corpus, ("random-weight twins of SmolLM2-135M and of its refactored "
                                   "ReadME shape (mean shared/expert sizes 318/450, untrained "
                                   "router, char tokenizer)")


def check_speed(work: Path, args: argparse.Namespace) -> dict:
    model, corpus, dense = args.model, args.corpus, args.dense
    if model is None and not args.twins:
        from readmoe.train.rounds import final_model_dir

        for run, found_corpus in FOUND:
            if any(Path(run).glob("round-*")) and Path(found_corpus).is_dir():
                model, corpus = str(final_model_dir(run)), found_corpus
                break
    label = model
    if model is None:
        model, dense, corpus, label = speed_twins(work)
    runs = {}
    for dtype in ("bfloat16", "float32"):
        out = Path(args.results) / "gpu" / dtype
        command = [sys.executable, str(ROOT / "benchmarks" / "engine_speed.py"), "--model",
                   str(model), "--corpus", str(corpus), "--device", args.device, "--dtype",
                   dtype, "--results", str(out), *(["--dense", str(dense)] if dense else []),
                   *args.speed_args]
        try:
            done = subprocess.run(command, capture_output=True, text=True,
                                  timeout=args.speed_timeout)
        except subprocess.TimeoutExpired as expired:
            runs[dtype] = {"exit_status": "timeout", "tail": str(expired.stdout or "")[-1500:]}
            continue
        runs[dtype] = {"exit_status": done.returncode, "tail": done.stdout[-1500:]
                       + done.stderr[-1500:]}
        if done.returncode == 0:
            runs[dtype]["rows"] = json.loads((out / "engine_speed.json").read_text())["rows"]
    return {"ok": all(r["exit_status"] == 0 for r in runs.values()), "model": label,
            "runs": runs}


def check_vllm() -> dict:
    """Whether vLLM is there to compare with (benchmarks/vllm_parity.py runs it)."""
    import importlib.util

    found = importlib.util.find_spec("vllm") is not None
    return {"ok": True if found else None, "vllm": found, "reason": None if found else (
        "vllm is not installed here; this workplace's device machines reach no package "
        "registry, and vLLM 0.34.0's CUDA wheel (239 MB) is over the 64 MiB a call carries and "
        "needs torch 2.14.0 (the H100 image has 2.11); the newest vLLM pinned to torch 2.11.0, "
        "0.26.0, is a 304 MB wheel (both measured 2026-12-06)")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a ReadME folder for engine_speed.py")
    parser.add_argument("--corpus", default=None, help="its corpus (prompts)")
    parser.add_argument("--dense", default=None, help="the dense model for engine_speed.py")
    parser.add_argument("--twins", action="store_true",
                        help="measure speed on random-weight twins even where runs/ has models")
    parser.add_argument("--speed-timeout", type=float, default=900,
                        help="seconds each engine_speed.py run may take")
    parser.add_argument("--results", default="results")
    parser.add_argument("--device", default="cuda",
                        help="cuda (the point); cpu runs the same checks as a dry run")
    parser.add_argument("--speed-args", nargs=argparse.REMAINDER, default=[],
                        help="passed on to engine_speed.py (e.g. --batches 1 --new-tokens 4)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no GPU: torch.cuda.is_available() is False (this script is for a "
                         "machine with CUDA; --device cpu for a dry run)")
    device = args.device
    from tests.server.helpers import save_tiny_model

    results = {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda,
               "gpu": torch.cuda.get_device_name(0) if device == "cuda" else "no GPU",
               "checks": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folder = save_tiny_model(work / "tiny")
        checks = {"placement": lambda: check_placement(device),
                  "engine": lambda: check_engine(folder, device),
                  "graphs": lambda: check_graphs(folder, device),
                  "cuda_store": lambda: check_store(folder, device),
                  "server": lambda: check_server(folder, device),
                  "train": lambda: check_train(work / "train-work", device),
                  "vllm": check_vllm,
                  "engine_speed": lambda: check_speed(work, args)}
        for name, check in checks.items():
            started = time.time()
            try:
                outcome = check()
            except Exception:
                outcome = {"ok": False, "error": traceback.format_exc()[-2000:]}
            outcome["seconds"] = round(time.time() - started, 1)
            results["checks"][name] = outcome
            print(name, VERDICT[outcome["ok"]], flush=True)
            atomic_write_json(Path(args.results) / "gpu_check.json", results)  # so far
    write_results(args.results, "gpu_check", results, report(results))
    return 0 if all(c["ok"] is not False for c in results["checks"].values()) else 1


def report(results: dict) -> str:
    lines = [f"# GPU check ({results['device']})", "",
             f"{results['gpu']}; torch {results['torch']}, CUDA {results['cuda']}; command "
             f"`{command_line()}`", "", "| check | result | seconds | note |", "|---|---|---:|---|"]
    lines += [f"| {name} | {VERDICT[c['ok']]} | {c['seconds']} | "
              f"{c.get('reason') or ''} |" for name, c in results["checks"].items()]
    speed = results["checks"].get("engine_speed", {})
    for dtype, run in speed.get("runs", {}).items():
        rate = {(r["peer"], r["batch"]): r["tokens_per_s"] for r in run.get("rows", [])}
        peers = [p for p in ("hf", "engine", "engine-eager", "hf-dense", "engine-dense",
                             "engine-dense-eager") if any(k[0] == p for k in rate)]
        lines += ["", f"engine_speed.py, {dtype}, model: {speed['model']} (tok/s)", "",
                  "| batch | " + " | ".join(peers) + " | engine / hf |",
                  "|---:|" + "---:|" * (len(peers) + 1)]
        for b in sorted({k[1] for k in rate}):
            ratio = (f"{rate[('engine', b)] / rate[('hf', b)]:.2f}x"
                     if ("engine", b) in rate and ("hf", b) in rate else "")
            lines.append(f"| {b} | " + " | ".join(
                f"{rate[(p, b)]:.1f}" if (p, b) in rate else "" for p in peers)
                + f" | {ratio} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
