"""The paper's serving experiments (Section 6): schedulers, cache policies, prefetch, and the
layer-wise baseline, on the simulator driven by trained routers' real routing, plus the
engine-vs-simulator cross-check on the real model.

Models: by default the last rounds of runs/bench/train-readme (pre-gating router) and
runs/bench/train-layerwise (layer-wise gates on the same experts), made by

    readmoe train runs/bench/moe-readme --corpus runs/bench/corpus --out runs/bench/train-X \\
        --router-type pregating|layerwise --rounds 3 --router-steps 25 --expert-steps 20 \\
        --batch-size 4 --block-size 256 --eval-tokens 4096

(``benchmarks/train_quality.py`` makes the first). Without the layer-wise run, the suite uses a
labelled Markov stand-in for it.

Writes results/serve_suite.{json,md} and results/serve_suite_{latency_cdf,hit_ratio}.png.

    .venv/bin/python benchmarks/serve_suite.py [--model DIR] [--layerwise DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from readmoe.cli.serve_suite_cmds import add_arguments, run_serve_suite

PREGATING_RUN = Path("runs/bench/train-readme")
LAYERWISE_RUN = Path("runs/bench/train-layerwise")


def last_round(run: Path) -> str | None:
    rounds = sorted(run.glob("round-*"), key=lambda p: int(p.name.split("-")[1]))
    return str(rounds[-1]) if rounds else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None,
                        help=f"a trained ReadME folder (default: last round of {PREGATING_RUN})")
    add_arguments(parser)
    args = parser.parse_args()
    model = args.model or last_round(PREGATING_RUN)
    layerwise = args.layerwise or last_round(LAYERWISE_RUN)
    for path in run_serve_suite(model, args.corpus, args.out, requests=args.requests,
                                layerwise=layerwise, rates=tuple(args.rates),
                                cross_check=not args.no_cross_check, seed=args.seed):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
