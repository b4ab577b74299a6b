"""`readmoe bench serve ...`: replay a synthetic workload through the serving engine."""

from __future__ import annotations

import argparse
import json

from readmoe.cli.serve_suite_cmds import register_suite
from readmoe.serve.experts import POLICIES
from readmoe.serve.experts.store import TIERS
from readmoe.serve.schedulers import SCHEDULERS


def register(commands: argparse._SubParsersAction) -> None:
    bench = commands.add_parser("bench", help="serving benchmarks")
    sub = bench.add_subparsers(dest="bench_command", required=True, metavar="SUBCOMMAND")
    serve = sub.add_parser(
        "serve", help="synthetic Chatbot-Arena-like requests, or a replayed JSONL trace, "
        "through the engine: latency (TTFT, TPOT, ITL, normalized), throughput, distinct "
        "experts per step and, offloaded, the expert cache's counters")
    serve.add_argument("model", help="a ReadME model folder")
    serve.add_argument("--corpus", help="a folder of <domain>.jsonl files: the synthetic "
                       "workload's prompt text comes from it")
    serve.add_argument("--trace", help="replay this JSONL trace instead (one request per line: "
                       "arrival_time, prompt (text or token ids), max_tokens, optional id)")
    serve.add_argument("--scheduler", default="fcfs", choices=sorted(SCHEDULERS))
    serve.add_argument("--max-experts", type=int, default=None,
                       help="expert-aware and cache-aware: choose at most this many experts "
                       "per step (aged requests excepted); cache-aware defaults to --capacity")
    serve.add_argument("--max-wait", type=int, default=None,
                       help="expert-aware and cache-aware: steps a request may wait before "
                       "it is served first (default 8)")
    serve.add_argument("--load-ratio", type=float, default=None,
                       help="cache-aware: a non-resident expert joins a step only if its queue "
                       "holds this many times the step's tokens (about the seconds to load "
                       "it into every layer over one step's; default 1)")
    serve.add_argument("--rate", type=float, default=float("inf"),
                       help="requests per second (Gamma arrivals; default: all at once)")
    serve.add_argument("--burstiness", type=float, default=1.0)
    serve.add_argument("--requests", type=int, default=32)
    serve.add_argument("--max-output", type=int, default=None,
                       help="cap on each request's output tokens (default: the workload's)")
    serve.add_argument("--max-batch-tokens", type=int, default=256)
    serve.add_argument("--max-seqs", type=int, default=32)
    serve.add_argument("--kv-blocks", type=int, default=1024)
    serve.add_argument("--block-size", type=int, default=16)
    serve.add_argument("--seed", type=int, default=0)
    store = serve.add_argument_group(
        "expert offloading", "with --capacity, routed experts live in a slow tier and at most "
        "that many per layer in the fast tier (default: all resident)")
    store.add_argument("--capacity", type=int, default=None, help="routed experts per layer "
                       "in the fast tier")
    store.add_argument("--cache-policy", default="belady", choices=sorted(POLICIES))
    store.add_argument("--prefetch", action=argparse.BooleanOptionalAction, default=True,
                       help="load layer l+1's experts while layer l computes (default) or "
                       "on demand (--no-prefetch)")
    store.add_argument("--tier", default="file", choices=TIERS,
                       help="slow tier: the model's safetensors read on demand, or CPU RAM")
    store.add_argument("--bandwidth", type=float, default=None,
                       help="emulate a link of this many bytes/s (e.g. 25e9 for PCIe 4.0 x16); "
                       "results are then labelled emulated")
    store.add_argument("--predictor", default=None,
                       help="predict each decoding request's next expert ('last' or 'mode-K') "
                       "so Belady and the prefetcher see past the current step")
    store.add_argument("--prefetch-rate", type=float, default=0.0,
                       help="with --predictor: experts per step loaded ahead for the next step "
                       "from the predicted demand, on average (fractions allowed: what the "
                       "copy stream loads in one step's compute; default 0: none)")
    serve.add_argument("--json", help="write the metrics as JSON to this file")
    serve.set_defaults(handler=run_serve)
    register_suite(sub)


def corpus_prompts(tokenizer, corpus_spec: str, docs_per_domain: int = 32, split: str = "all"):
    """A workload prompt provider: ``length`` consecutive tokens of one corpus document of
    ``split``, at a random place (documents shorter than the prompt are skipped)."""
    from readmoe.data.corpus import load_corpus
    from readmoe.errors import ReadmoeError
    from readmoe.serve.workload import Prompt

    corpus = load_corpus(corpus_spec)
    docs = [tokenizer.encode(text) for domain in corpus.domains
            for text in corpus.documents(domain, split)[:docs_per_domain]]

    def provide(length, rng):
        fitting = [d for d in docs if len(d) >= length]
        if not fitting:
            raise ReadmoeError(f"no corpus document has {length} tokens for a prompt")
        doc = rng.choice(fitting)
        start = rng.randrange(len(doc) - length + 1)
        return Prompt(length, tokens=tuple(doc[start:start + length]))

    return provide


def serve_workload(model_dir: str, corpus: str | None, *, trace: str | None = None,
                   scheduler: str = "fcfs",
                   rate: float = float("inf"), burstiness: float = 1.0, requests: int = 32,
                   max_output: int | None = None, max_batch_tokens: int = 256,
                   max_seqs: int = 32, kv_blocks: int = 1024, block_size: int = 16,
                   seed: int = 0, max_experts: int | None = None,
                   max_wait: int | None = None, load_ratio: float | None = None,
                   capacity: int | None = None, cache_policy: str = "belady",
                   prefetch: bool = True, tier: str = "file",
                   bandwidth: float | None = None, predictor: str | None = None,
                   prefetch_rate: float = 0.0) -> dict:
    """Replay a synthetic workload (prompts from ``corpus``) or a JSONL ``trace`` through the
    engine (experts resident, or offloaded to a store when ``capacity`` is given); return the
    metrics with what produced them."""
    from contextlib import nullcontext
    from dataclasses import replace

    from readmoe.errors import ReadmoeError
    from readmoe.models import load_model, load_tokenizer
    from readmoe.serve.engine import Engine
    from readmoe.serve.experts import CoDesign
    from readmoe.serve.experts.store import ExpertStore
    from readmoe.serve.placement import place_for_offload, routed_expert_bytes
    from readmoe.serve.schedulers import make_scheduler
    from readmoe.serve.types import Budget
    from readmoe.serve.workload import load_trace, synthetic_workload

    options = {name: value for name, value in (("max_experts", max_experts),
                                               ("max_wait", max_wait),
                                               ("load_ratio", load_ratio)) if value is not None}
    batching = make_scheduler(scheduler, **options)
    codesign = CoDesign(predictor, prefetch_rate)
    if capacity is None and (bandwidth is not None or tier != "file" or predictor
                             or prefetch_rate):
        raise ReadmoeError("--tier, --bandwidth, --predictor and --prefetch-rate describe "
                           "expert offloading: add --capacity K")
    if (corpus is None) == (trace is None):
        raise ReadmoeError("give either --corpus (a synthetic workload) or --trace (a JSONL "
                           "trace to replay)")
    model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
    if trace is not None:
        specs = load_trace(trace, tokenizer.encode)
    else:
        specs = synthetic_workload(requests, rate, corpus_prompts(tokenizer, corpus),
                                   burstiness=burstiness, seed=seed)
    if max_output:
        specs = [replace(s, max_tokens=min(s.max_tokens, max_output)) for s in specs]
    offloaded = capacity is not None
    store = (ExpertStore(model_dir, capacity=capacity, policy=cache_policy, tier=tier,
                         bandwidth=bandwidth) if offloaded else nullcontext())
    released = place_for_offload(model, model.device) if offloaded else 0
    with store:
        engine = Engine(model, tokenizer, batching, Budget(max_batch_tokens, max_seqs),
                        kv_blocks, block_size, expert_store=store if offloaded else None,
                        prefetch=prefetch and offloaded,
                        codesign=codesign if offloaded else None)
        experts = ({"store": store.describe(), "capacity": capacity,
                    "cache_policy": cache_policy, "prefetch": prefetch,
                    "predictor": predictor, "prefetch_rate": prefetch_rate,
                    "emulated_link": bandwidth, "expert_bytes_released": released,
                    "fast_tier_bytes": store.fast_tier_bytes}
                   if offloaded else {"store": "all routed experts resident",
                                      "routed_expert_bytes": routed_expert_bytes(model)})
        workload = ({"trace": trace} if trace is not None else
                    {"corpus": corpus, "rate": rate, "requests": requests, "seed": seed})
        return {"model": model_dir, "scheduler": scheduler, "scheduler_options": options,
                "workload": workload, "experts": experts,
                **engine.run_workload(specs)}


def run_serve(args: argparse.Namespace) -> int:
    from readmoe.io import atomic_write_json

    result = serve_workload(
        args.model, args.corpus, trace=args.trace, scheduler=args.scheduler, rate=args.rate,
        burstiness=args.burstiness, requests=args.requests, max_output=args.max_output,
        max_batch_tokens=args.max_batch_tokens, max_seqs=args.max_seqs,
        kv_blocks=args.kv_blocks, block_size=args.block_size, seed=args.seed,
        max_experts=args.max_experts, max_wait=args.max_wait, load_ratio=args.load_ratio,
        capacity=args.capacity, cache_policy=args.cache_policy, prefetch=args.prefetch,
        tier=args.tier, bandwidth=args.bandwidth, predictor=args.predictor,
        prefetch_rate=args.prefetch_rate)
    print(json.dumps(result, indent=2))
    if args.json:
        atomic_write_json(args.json, result)
    return 0
