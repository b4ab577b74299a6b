"""`readmoe stats` and `readmoe refactor`: dense model -> ReadME mixture of experts."""

from __future__ import annotations

import argparse
import json

from readmoe.cli.model_cmds import MODEL_HELP
from readmoe.models.device import add_placement_args, placement_from_args
from readmoe.refactor.importance import CRITERIA, DEFAULT_CRITERION
from readmoe.refactor.pipeline import DEFAULT_BLOCK_SIZE, DEFAULT_STATS_TOKENS
from readmoe.refactor.planners import PLANNERS


def register(commands: argparse._SubParsersAction) -> None:
    stats = commands.add_parser(
        "stats", help="per-domain mean |FFN activation|, its mean square and its mean per "
        "channel and layer")
    stats.add_argument("model", help=MODEL_HELP)
    stats.add_argument("--corpus", required=True, help="a folder of <domain>.jsonl files")
    stats.add_argument("--out", required=True, help="statistics folder (resumed if present; "
                       "refused if made from other inputs)")
    stats.add_argument("--tokens", type=int, default=DEFAULT_STATS_TOKENS,
                       help=f"statistics tokens per domain (default {DEFAULT_STATS_TOKENS})")
    stats.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE)
    stats.add_argument("--batch-size", type=int, default=4)
    _recompute_arg(stats)
    add_placement_args(stats)
    stats.set_defaults(handler=run_stats_cmd)

    refactor = commands.add_parser(
        "refactor", help="carve a shared expert and routed experts out of a dense model")
    refactor.add_argument("model", help=MODEL_HELP)
    refactor.add_argument("--corpus", required=True, help="a folder of <domain>.jsonl files")
    refactor.add_argument("--out", required=True, help="the ReadME model folder to write")
    refactor.add_argument("--method", default="readme", choices=sorted(PLANNERS),
                          help="expert planning method (default readme, the paper's)")
    add_importance_arg(refactor)
    refactor.add_argument("--keep", type=float, default=0.5,
                          help="share of FFN channels each domain keeps (default 0.5)")
    refactor.add_argument("--stats", help="statistics folder: reused if made from this model "
                          "and corpus (and --tokens, --block-size when given), computed there "
                          "if absent, refused otherwise (default: a cache keyed by all inputs)")
    refactor.add_argument("--seed", type=int, default=0)
    refactor.add_argument("--tokens", type=int, help="statistics tokens per domain (default: "
                          f"the --stats folder's, else {DEFAULT_STATS_TOKENS})")
    refactor.add_argument("--block-size", type=int, help="statistics block size (default: the "
                          f"--stats folder's, else {DEFAULT_BLOCK_SIZE})")
    _recompute_arg(refactor)
    refactor.add_argument("--compensate", action="store_true",
                          help="add to each expert (prune: each layer) the mean output of the "
                          "channels it drops, as an output bias; with --refit the bias is "
                          "fitted with the columns by least squares")
    refactor.add_argument("--refit", action="store_true",
                          help="refit the kept channels' down projection by least squares so "
                          "each FFN best reproduces the dense output on the statistics' tokens "
                          "(computes their second moments into the statistics folder)")
    refactor.add_argument("--sequential", action="store_true",
                          help="with --refit: fit each layer on the inputs the carved layers "
                          "before it give it (GPTQ-style, layer by layer; about one forward "
                          "pass over the statistics' tokens, held in memory) instead of the "
                          "dense model's")
    refactor.add_argument("--refit-target", default="ffn", choices=["ffn", "layer"],
                          help="with --sequential, what each layer is fitted to: the dense "
                          "FFN's output on the carved model's inputs (ffn, default) or the "
                          "dense layer's output on the dense model's inputs, so the FFN also "
                          "makes up for the drift left by the layers before it (layer)")
    add_placement_args(refactor)
    refactor.set_defaults(handler=run_refactor_cmd)


def add_importance_arg(parser: argparse.ArgumentParser, default: str = DEFAULT_CRITERION
                       ) -> None:
    """``--importance``, shared with the demo so both offer the same criteria."""
    parser.add_argument("--importance", default=default, choices=CRITERIA,
                        help="how channels are ranked, for every method alike: activation "
                        "(mean |act|, the paper's), weighted (times the norm of the channel's "
                        "down_proj column) or contribution (mean squared act times the squared "
                        f"column norm); default {default}")


def _recompute_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recompute-stats", action="store_true",
                        help="delete the statistics in the folder and compute them afresh")


def run_stats_cmd(args: argparse.Namespace) -> int:
    from readmoe.refactor.pipeline import run_stats

    stats, out = run_stats(args.model, args.corpus, args.out, tokens=args.tokens,
                           block_size=args.block_size, batch_size=args.batch_size,
                           placement=placement_from_args(args), recompute=args.recompute_stats)
    print(json.dumps({"out": str(out), "tokens": stats.tokens}, indent=2))
    return 0


def run_refactor_cmd(args: argparse.Namespace) -> int:
    from readmoe.refactor.pipeline import run_refactor

    plan = run_refactor(args.model, args.corpus, args.out, method=args.method, keep=args.keep,
                        stats_dir=args.stats, seed=args.seed, tokens=args.tokens,
                        block_size=args.block_size, recompute_stats=args.recompute_stats,
                        compensate=args.compensate, refit=args.refit,
                        sequential=args.sequential, refit_target=args.refit_target,
                        importance=args.importance,
                        placement=placement_from_args(args))
    sizes = [(lp.shared_size, lp.expert_size) for lp in plan.layers]
    print(json.dumps({"out": args.out, "method": plan.method, "importance": plan.importance,
                      "experts": plan.expert_names,
                      "shared_and_expert_sizes": sizes}))
    return 0
