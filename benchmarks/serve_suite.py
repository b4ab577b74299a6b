"""The paper's serving experiments (Section 6): schedulers, cache policies, prefetch, and the
layer-wise baseline, on the simulator driven by a trained ReadME router's real routing.

Writes results/serve_suite.{json,md} and results/serve_suite_{latency_cdf,hit_ratio}.png.

    .venv/bin/python benchmarks/serve_suite.py [--model runs/bench/train-readme/round-3]
"""

from __future__ import annotations

import argparse
import sys

from readmoe.cli.serve_suite_cmds import add_arguments, run_serve_suite


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="runs/bench/train-readme/round-3")
    add_arguments(parser)
    args = parser.parse_args()
    for path in run_serve_suite(args.model, args.corpus, args.out, requests=args.requests,
                                layerwise=args.layerwise, rates=tuple(args.rates),
                                cross_check=not args.no_cross_check, seed=args.seed):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
