"""`readmoe analyze MODEL`: layer-wise redundancy and temporal locality of a ReadME model's
routing, the evidence behind the pre-gating router (see readmoe.analysis)."""

from __future__ import annotations

import argparse

from readmoe.models.device import add_placement_args, placement_from_args

DEFAULT_TOKENS = 4096  # per domain: the paper's locality count is over 4096 tokens
DEFAULT_BLOCK = 512


def register(commands: argparse._SubParsersAction) -> None:
    analyze = commands.add_parser(
        "analyze", help="routing analysis: layer redundancy, temporal locality, domains",
        description="Route held-out tokens through the oracle (dense activations), MODEL's "
        "pre-gating router and optionally a layer-wise baseline; write analysis.json, "
        "analysis.md and PNG figures.")
    analyze.add_argument("model", help="a ReadME model folder (router pregating, or none to "
                         "analyse the oracle only)")
    analyze.add_argument("--corpus", required=True,
                         help="a folder of <domain>.jsonl files (readmoe corpus build)")
    analyze.add_argument("--out", required=True, help="output folder")
    analyze.add_argument("--tokens", type=int, default=DEFAULT_TOKENS,
                         help=f"held-out tokens per domain at most (default {DEFAULT_TOKENS})")
    analyze.add_argument("--block-size", type=int, default=DEFAULT_BLOCK,
                         help=f"tokens per sequence (default {DEFAULT_BLOCK}); locality is "
                         "measured within a sequence")
    analyze.add_argument("--batch-size", type=int, default=8)
    analyze.add_argument("--layerwise", metavar="MODEL2",
                         help="a ReadME folder with the same plan and a layer-wise router, "
                         "the baseline")
    analyze.add_argument("--dense", help="dense source model for the oracle (default: the one "
                         "recorded in MODEL's plan)")
    add_placement_args(analyze)
    analyze.set_defaults(handler=run_analyze)


def run_analyze(args: argparse.Namespace) -> int:
    from readmoe.analysis.collect import collect_choices
    from readmoe.analysis.report import write_analysis
    from readmoe.errors import ReadmoeError

    if args.tokens < args.block_size:
        raise ReadmoeError(f"--tokens {args.tokens} is less than one block of "
                           f"--block-size {args.block_size}")
    choices = collect_choices(args.model, args.corpus, tokens=args.tokens,
                              block_size=args.block_size, batch_size=args.batch_size,
                              layerwise=args.layerwise, dense=args.dense,
                              placement=placement_from_args(args))
    meta = {"model": args.model, "layerwise_model": args.layerwise, "dense": args.dense,
            "corpus": args.corpus,
            "router_type": "pregating" if choices.pregating is not None else "none"}
    analysis = write_analysis(choices, args.out, meta)
    redundancy = analysis["layer_redundancy"]["oracle"]["mean_normalised_mi"]
    locality = analysis["temporal_locality"]
    main = locality.get("pregating", locality["oracle"])
    print(f"wrote {args.out}/analysis.json, analysis.md and figures: oracle mean normalised "
          f"MI {redundancy if redundancy is None else round(redundancy, 3)}, "
          f"reuse share {100 * main['reuse_share']:.1f}%")
    return 0
