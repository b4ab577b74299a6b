"""`readmoe bench serve-suite MODEL --out DIR`: the paper's serving experiments (serve.suite).

``register_suite(bench_subparsers)`` adds the command to an existing ``bench`` group (another
module owns ``bench``); ``run_serve_suite`` is what the command and benchmarks/serve_suite.py
both call. Without a model folder the suite falls back to Markov routing with the paper's
locality, and says so in every output.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
from pathlib import Path

DIFFERENCES_TRACE = (
    "- The clock is the simulator's `a100-llama2-7b` profile, a projection: our model is "
    "SmolLM2-135M refactored, so its routing (not its speed) drives the numbers.\n"
    "- Our model has {experts} routed experts chosen by a router trained for a few hundred "
    "steps on CPU; the paper's has its own expert count and about 1B training tokens, so its "
    "temporal locality (2921 of 4096 reuses) may differ from ours.\n"
    "- Output routing is teacher-forced on the text that follows the prompt, not the model's "
    "own samples; prompts are corpus segments with Chatbot Arena lengths, not Arena prompts.\n"
    "- The paper does not say what a cache slot or a time step is; ours: one expert of one "
    "layer, and one (step, layer). Belady reads the scheduled and queued tokens' routing.\n"
    "- The layer-wise baseline: {layerwise}.")
DIFFERENCES_MARKOV = (
    "- **No trained model was found**: routing is a labelled Markov stand-in ({experts} experts, "
    "reuse probability 2921/4096 as the paper measured), not a router on real text.\n"
    "- The clock is the simulator's `a100-llama2-7b` profile, a projection, not a measurement.\n"
    "- The layer-wise baseline: {layerwise}.")


def run_serve_suite(model: str | None, corpus: str, out: str, *, requests: int = 200,
                    layerwise: str | None = None, rates: tuple[float, float] = (0.5, 2.0),
                    cross_check: bool = True, seed: int = 0) -> list[Path]:
    """Build the routing inputs, run the suite, write the files; return their paths."""
    from readmoe.serve.routing_sources import PAPER_REUSE
    from readmoe.serve.suite import (
        MIXTRAL_REUSE,
        SuiteConfig,
        engine_cross_check,
        markov_input,
        run_suite,
        trace_input,
    )
    from readmoe.serve.suite_report import write_results

    config = SuiteConfig(rates=rates, seed=seed)
    trace = None
    if model and Path(model).is_dir():
        from readmoe.data.corpus import load_corpus
        from readmoe.models import load_model, load_tokenizer
        from readmoe.serve.traces import route_corpus

        served, tokenizer = load_model(model), load_tokenizer(model)
        trace = route_corpus(served, tokenizer, load_corpus(corpus), requests, seed=seed)
        pregating = trace_input(trace, f"pre-gating router of {model} on {corpus} (held-out "
                                f"text, teacher-forced; {trace.shortened} requests shortened)",
                                seed=seed)
        experts = trace.num_experts
    else:
        experts = 8
        pregating = markov_input(experts, PAPER_REUSE, requests,
                                 f"MARKOV STAND-IN (no model at {model}): {experts} experts, "
                                 "reuse 2921/4096", seed)
    if layerwise:
        from readmoe.data.corpus import load_corpus
        from readmoe.models import load_model, load_tokenizer
        from readmoe.serve.traces import route_corpus

        lw_model = load_model(layerwise)
        lw_trace = route_corpus(lw_model, load_tokenizer(layerwise), load_corpus(corpus),
                                requests, seed=seed)
        middle = lw_model.config.num_hidden_layers // 2
        lw = trace_input(lw_trace, f"layer-wise gates of {layerwise}: each layer's own "
                         f"choices on the same held-out text (layer {middle}'s as the token's "
                         "expert where one is needed)", layer=middle, seed=seed)
    else:
        lw = markov_input(experts, MIXTRAL_REUSE, requests,
                          f"MARKOV STAND-IN: {experts} experts, reuse 850/4096 "
                          "(Mixtral's measured locality)", seed)
    result = run_suite(pregating, lw, config)
    if cross_check and trace is not None:
        result["engine_cross_check"] = engine_cross_check(model, trace, model=served,
                                                          tokenizer=tokenizer)
    template = DIFFERENCES_TRACE if trace is not None else DIFFERENCES_MARKOV
    differences = template.format(experts=experts, layerwise=lw.label)
    machine = (f"{platform.platform()}, {platform.processor() or platform.machine()}, "
               f"{os.cpu_count()} CPUs, Python {platform.python_version()}")
    command = shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])
    return write_results(result, out, command, machine, differences)


def _handle(args: argparse.Namespace) -> int:
    paths = run_serve_suite(args.model, args.corpus, args.out, requests=args.requests,
                            layerwise=args.layerwise, rates=tuple(args.rates),
                            cross_check=not args.no_cross_check, seed=args.seed)
    for path in paths:
        print(path)
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--corpus", default="runs/bench/corpus")
    parser.add_argument("--out", default="results")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--layerwise", default=None,
                        help="a ReadME folder with a layer-wise router, built from the same "
                        "experts (else a labelled Markov stand-in)")
    parser.add_argument("--rates", type=float, nargs=2, default=[0.5, 2.0],
                        help="the two request rates (requests/s)")
    parser.add_argument("--no-cross-check", action="store_true",
                        help="skip the short engine-vs-simulator run on the real model")
    parser.add_argument("--seed", type=int, default=0)


def register_suite(bench_subparsers) -> None:
    """Add `serve-suite` to an existing `bench` subparsers object."""
    parser = bench_subparsers.add_parser(
        "serve-suite", help="the paper's serving experiments on the simulator, real routing")
    parser.add_argument("model", help="a trained ReadME folder with a pre-gating router")
    add_arguments(parser)
    parser.set_defaults(handler=_handle)
