"""`readmoe bench serve ...`: replay a synthetic workload through the serving engine, in
process or over HTTP against a running `readmoe serve` (``--endpoint``)."""

from __future__ import annotations

import argparse
import json

from readmoe.cli.engine_args import add_engine_args, engine_options
from readmoe.cli.serve_suite_cmds import register_suite
from readmoe.models.device import Placement, add_placement_args, placement_from_args
from readmoe.serve.launch import EngineOptions


def register(commands: argparse._SubParsersAction) -> None:
    bench = commands.add_parser("bench", help="serving benchmarks")
    sub = bench.add_subparsers(dest="bench_command", required=True, metavar="SUBCOMMAND")
    serve = sub.add_parser(
        "serve", help="synthetic Chatbot-Arena-like requests, or a replayed JSONL trace, "
        "through the engine or a running server (--endpoint): latency (TTFT, TPOT, ITL, "
        "normalized), throughput, distinct experts per step and, offloaded, the expert "
        "cache's counters")
    serve.add_argument("model", help="a ReadME model folder (with --endpoint: the served "
                       "model, for its tokenizer and name)")
    serve.add_argument("--corpus", help="a folder of <domain>.jsonl files: the synthetic "
                       "workload's prompt text comes from it")
    serve.add_argument("--trace", help="replay this JSONL trace instead (one request per line: "
                       "arrival_time, prompt (text or token ids), max_tokens, optional id)")
    serve.add_argument("--endpoint", default=None,
                       help="send the workload over HTTP to a running `readmoe serve` at this "
                       "URL (e.g. http://127.0.0.1:8000) instead of an engine in process; the "
                       "server's own flags then decide batching and offloading")
    serve.add_argument("--served-model-name", default=None,
                       help="with --endpoint: the model name the server serves (default MODEL)")
    serve.add_argument("--api-key", default=None,
                       help="with --endpoint: the server's key (default $READMOE_API_KEY)")
    serve.add_argument("--rate", type=float, default=float("inf"),
                       help="requests per second (Gamma arrivals; default: all at once)")
    serve.add_argument("--burstiness", type=float, default=1.0)
    serve.add_argument("--requests", type=int, default=32)
    serve.add_argument("--max-output", type=int, default=None,
                       help="cap on each request's output tokens (default: the workload's)")
    serve.add_argument("--seed", type=int, default=0)
    add_engine_args(serve)
    add_placement_args(serve)
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


def check_workload_source(corpus: str | None, trace: str | None) -> None:
    from readmoe.errors import ReadmoeError

    if (corpus is None) == (trace is None):
        raise ReadmoeError("give either --corpus (a synthetic workload) or --trace (a JSONL "
                           "trace to replay)")


def workload_specs(tokenizer, corpus: str | None, trace: str | None, *, requests: int = 32,
                   rate: float = float("inf"), burstiness: float = 1.0, seed: int = 0,
                   max_output: int | None = None) -> list:
    """The requests of a synthetic workload (prompts from ``corpus``) or a JSONL ``trace``."""
    from dataclasses import replace

    from readmoe.serve.workload import load_trace, synthetic_workload

    check_workload_source(corpus, trace)
    if trace is not None:
        specs = load_trace(trace, tokenizer.encode)
    else:
        specs = synthetic_workload(requests, rate, corpus_prompts(tokenizer, corpus),
                                   burstiness=burstiness, seed=seed)
    if max_output:
        specs = [replace(s, max_tokens=min(s.max_tokens, max_output)) for s in specs]
    return specs


def _workload_info(corpus, trace, rate, requests, seed) -> dict:
    return ({"trace": trace} if trace is not None else
            {"corpus": corpus, "rate": rate, "requests": requests, "seed": seed})


def serve_workload(model_dir: str, corpus: str | None, *, trace: str | None = None,
                   rate: float = float("inf"), burstiness: float = 1.0, requests: int = 32,
                   max_output: int | None = None, seed: int = 0,
                   options: EngineOptions | None = None,
                   placement: Placement | None = None) -> dict:
    """Replay a synthetic workload (prompts from ``corpus``) or a JSONL ``trace`` through the
    engine (experts resident, or offloaded to a store when ``options.capacity`` is given);
    return the metrics with what produced them."""
    from readmoe.models.device import resolve_placement
    from readmoe.serve.launch import open_engine

    options = options or EngineOptions()
    options.validate()
    check_workload_source(corpus, trace)
    placement = placement or resolve_placement()
    with open_engine(model_dir, options, placement) as served:
        specs = workload_specs(served.tokenizer, corpus, trace, requests=requests, rate=rate,
                               burstiness=burstiness, seed=seed, max_output=max_output)
        return {"model": model_dir, "scheduler": options.scheduler,
                "scheduler_options": options.scheduler_options(),
                "workload": _workload_info(corpus, trace, rate, requests, seed),
                "experts": served.experts, **placement.to_dict(),
                **served.engine.run_workload(specs)}


def serve_workload_http(model_dir: str, corpus: str | None, endpoint: str, *,
                        trace: str | None = None, rate: float = float("inf"),
                        burstiness: float = 1.0, requests: int = 32,
                        max_output: int | None = None, seed: int = 0,
                        served_model_name: str | None = None,
                        api_key: str | None = None) -> dict:
    """The same workload as ``serve_workload``, sent to a running server over HTTP."""
    from readmoe.models import load_tokenizer
    from readmoe.server.http_bench import replay_http

    check_workload_source(corpus, trace)
    specs = workload_specs(load_tokenizer(model_dir), corpus, trace, requests=requests,
                           rate=rate, burstiness=burstiness, seed=seed, max_output=max_output)
    return {"model": served_model_name or model_dir,
            "workload": _workload_info(corpus, trace, rate, requests, seed),
            **replay_http(endpoint, served_model_name or model_dir, specs, api_key)}


def run_serve(args: argparse.Namespace) -> int:
    from readmoe.errors import ReadmoeError
    from readmoe.io import atomic_write_json

    if args.endpoint is not None:
        if args.capacity is not None or args.device is not None or args.dtype is not None:
            raise ReadmoeError("with --endpoint the server decides where experts live and "
                               "the device: give --capacity, --device and --dtype to "
                               "`readmoe serve`")
        from readmoe.server.config import api_key_from

        result = serve_workload_http(
            args.model, args.corpus, args.endpoint, trace=args.trace, rate=args.rate,
            burstiness=args.burstiness, requests=args.requests, max_output=args.max_output,
            seed=args.seed, served_model_name=args.served_model_name,
            api_key=api_key_from(args.api_key))
    else:
        result = serve_workload(
            args.model, args.corpus, trace=args.trace, rate=args.rate,
            burstiness=args.burstiness, requests=args.requests, max_output=args.max_output,
            seed=args.seed, options=engine_options(args), placement=placement_from_args(args))
    print(json.dumps(result, indent=2))
    if args.json:
        atomic_write_json(args.json, result)
    return 0
