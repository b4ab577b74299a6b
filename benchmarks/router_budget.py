"""Is the trained router the limit? More router steps on a trained ReadME model, experts fixed.

Why: at the quality curve's largest budget ReadME with its own router trails oracle routing most
on code (results/quality_curve-nodecay.md), and that one domain is where it loses to prune. The
router's targets come from the dense model, not from the experts, so the router can keep
learning after the last round without touching the backbone. This script takes the curve's
final ReadME folder, continues its router with the trainer's own router phase (same loss, same
target blocks in the same order, wrapping around them, backbone frozen), and scores each extra
budget: routing accuracy against the oracle on held-out text, held-out perplexity per domain
beside the trained prune model of the same curve, and the router's temporal locality (the share
of held-out tokens routed to the previous token's expert: what an expert cache and the serving
engine's next-expert predictor live on; the oracle's beside it). Router steps are cheap (the
router is a one-block transformer of width 128), so the question is whether spending more of
them pays, and what it does to locality. ``--start`` continues another model's router (e.g. a
run trained without the final router phase) on the curve's targets.

Writes results/<NAME>.{json,md}; with ``--keep`` also the models, for lm-eval. Needs the
curve's run folder (benchmarks/quality_curve.py).

    .venv/bin/python benchmarks/router_budget.py [--extra-steps 0 320 640 1280]
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from readmoe.analysis.information import reuse_share
from readmoe.data.corpus import load_corpus
from readmoe.errors import ReadmoeError
from readmoe.eval.domains import domain_perplexity, domain_wins, heldout_blocks
from readmoe.eval.routing_modes import oracle_for
from readmoe.io import command_line, write_results
from readmoe.models import load_model, load_tokenizer
from readmoe.refactor.plan import ExpertPlan
from readmoe.refactor.slicing import save_readme
from readmoe.train.config import RECIPES, TrainConfig
from readmoe.train.data import BlockSchedule
from readmoe.train.phases import Distributed, run_router_phase
from readmoe.train.rounds import final_model_dir
from readmoe.train.targets import DistillTargets


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--curve", default="runs/quality_curve-nodecay",
                        help="a quality-curve run folder (train-readme/, train-prune/)")
    parser.add_argument("--corpus", default="runs/demo/corpus")
    parser.add_argument("--start", default=None, help="the ReadME folder whose router continues "
                        "(default: the curve's final ReadME round)")
    parser.add_argument("--extra-steps", type=int, nargs="+", default=[0, 320, 640, 1280])
    parser.add_argument("--batch-size", type=int, default=4, help="as the curve's rounds")
    parser.add_argument("--lr-router", type=float, default=RECIPES["small"].lr_router)
    parser.add_argument("--eval-tokens", type=int, default=2048, help="held-out, per domain")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--keep", default=None, help="save each model with extra router steps "
                        "as <KEEP>/router+<N> (for benchmarks/quality.py)")
    parser.add_argument("--results", default="results")
    parser.add_argument("--name", default="router_budget")
    return parser.parse_args()


@torch.no_grad()
def routing_accuracy(model, blocks: dict[str, torch.Tensor],
                     oracle_ids: dict[str, torch.Tensor]) -> dict[str, float]:
    """Share of held-out tokens whose router expert is the oracle's, per domain."""
    return {domain: float((model.route(b)[0] == oracle_ids[domain]).float().mean())
            for domain, b in blocks.items()}


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    curve = Path(args.curve)
    readme_dir = Path(args.start) if args.start else final_model_dir(curve / "train-readme")
    prune_dir = final_model_dir(curve / "train-prune")
    targets_dir = curve / "train-readme" / "targets"
    if not (targets_dir / "targets.json").is_file():
        raise ReadmoeError(f"{targets_dir} holds no distillation targets: run "
                           "benchmarks/quality_curve.py first")
    started = time.time()
    tokenizer, corpus = load_tokenizer(str(readme_dir)), load_corpus(args.corpus)
    targets = DistillTargets.load(targets_dir)
    first = load_model(str(readme_dir))
    oracle = oracle_for(readme_dir, None, like=first)
    blocks = {d: heldout_blocks(corpus, tokenizer, d, max_tokens=args.eval_tokens)
              for d in corpus.domains}
    oracle_ids = {d: oracle.expert_ids(b) for d, b in blocks.items()}
    prune = domain_perplexity(load_model(str(prune_dir)), tokenizer, corpus,
                              model_name=str(prune_dir), max_tokens=args.eval_tokens,
                              extra={"label": "prune"})
    rows = []
    for extra in sorted(set(args.extra_steps)):
        model = first if extra == 0 else load_model(str(readme_dir))
        if extra:
            config = TrainConfig(rounds=1, router_steps=extra, expert_steps=0,
                                 batch_size=args.batch_size, lr_router=args.lr_router)
            schedule = BlockSchedule(targets.tokens, args.batch_size)
            run_router_phase(model, schedule, targets, 0, args.lr_router, config, Distributed())
            if args.keep:
                save_readme(model, Path(args.keep) / f"router+{extra}", tokenizer=tokenizer,
                            plan=ExpertPlan.load(readme_dir / "plan"))
        report = domain_perplexity(model, tokenizer, corpus, model_name=str(readme_dir),
                                   max_tokens=args.eval_tokens,
                                   extra={"label": f"readme +{extra}"})
        wins = domain_wins([report, prune], report["label"], "prune")
        rows.append({"extra_steps": extra,
                     "extra_router_tokens": extra * args.batch_size * targets.tokens.shape[1],
                     "accuracy": routing_accuracy(model, blocks, oracle_ids),
                     "locality": {d: reuse_share(model.route(b)[0].cpu().numpy())
                                  for d, b in blocks.items()},
                     "ppl": report, "wins_over_prune": wins})
        print(f"+{extra} router steps: beats prune on {wins['count']} of {wins['of']}",
              flush=True)
    summary = {"command": command_line(), "machine": f"{platform.machine()} cpu, "
               f"{args.threads} threads, fp32", "readme": str(readme_dir),
               "prune": str(prune_dir), "target_blocks": targets.tokens.shape[0],
               "seconds": round(time.time() - started), "prune_ppl": prune,
               "oracle_locality": {d: reuse_share(ids.cpu().numpy())
                                   for d, ids in oracle_ids.items()},
               "rows": rows}
    write_results(args.results, args.name, summary, render(summary))
    return 0


def render(summary: dict) -> str:
    domains = list(summary["prune_ppl"]["domains"])
    lines = ["# More router steps on the trained ReadME model (experts fixed)", "",
             f"Command: `{summary['command']}`; {summary['machine']}; {summary['seconds']} s. "
             f"Model {summary['readme']}, prune {summary['prune']}; the router phase wraps "
             f"around the run's {summary['target_blocks']} target blocks. Cells: routing "
             "accuracy against the oracle / held-out perplexity.", "",
             "| extra router steps | " + " | ".join(domains) + " | mean ppl | beats prune on "
             "| locality (mean over domains) |",
             "|---:|" + "---:|" * (len(domains) + 3)]
    prune = summary["prune_ppl"]["domains"]
    lines.append("| prune | " + " | ".join(f"- / {prune[d]['ppl']:.1f}" for d in domains)
                 + f" | {sum(prune[d]['ppl'] for d in domains) / len(domains):.1f} | - | - |")
    oracle = summary["oracle_locality"]
    lines.append("| oracle routing | " + " | ".join("-" for _ in domains)
                 + f" | - | - | {sum(oracle.values()) / len(oracle):.1%} |")
    for row in summary["rows"]:
        ppl, acc = row["ppl"]["domains"], row["accuracy"]
        mean = sum(ppl[d]["ppl"] for d in domains) / len(domains)
        wins = row["wins_over_prune"]
        lines.append(f"| {row['extra_steps']} | "
                     + " | ".join(f"{acc[d]:.0%} / {ppl[d]['ppl']:.1f}" for d in domains)
                     + f" | {mean:.1f} | {wins['count']} of {wins['of']} | "
                     f"{sum(row['locality'].values()) / len(row['locality']):.1%} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
