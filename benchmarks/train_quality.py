"""Trained ReadME (pre-gating router + tuned experts) against the prune baseline trained with
the same expert-tuning tokens, on per-domain held-out perplexity; router accuracy against the
oracle label; and the router's share of a decode step's time at batch 1 and 32.

Writes results/train_quality.{json,md,png}.

    .venv/bin/python benchmarks/train_quality.py [--rounds 4 --router-steps 25 --expert-steps 25]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

from readmoe.data.corpus import build_corpus, load_corpus
from readmoe.eval.domains import domain_wins, evaluate_model, format_ppl_table
from readmoe.eval.router_cost import router_share
from readmoe.io import atomic_save_figure, command_line, write_results
from readmoe.models import load_model, load_tokenizer
from readmoe.refactor.pipeline import run_refactor, run_stats
from readmoe.train.config import TrainConfig
from readmoe.train.rounds import Trainer, final_model_dir


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--work", default="runs/bench")
    parser.add_argument("--results", default="results")
    parser.add_argument("--corpus-bytes", type=int, default=1_000_000)
    parser.add_argument("--stats-tokens", type=int, default=16384)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--router-steps", type=int, default=25)
    parser.add_argument("--expert-steps", type=int, default=25)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--lr-router", type=float, default=2e-3)
    parser.add_argument("--lr-experts", type=float, default=2e-4)
    parser.add_argument("--kd-weight", type=float, default=1.0)
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    work, results = Path(args.work), Path(args.results)
    started = time.time()
    corpus_dir = work / "corpus"
    build_corpus(corpus_dir, max_bytes_per_domain=args.corpus_bytes, progress=False)
    corpus = load_corpus(corpus_dir)
    _, stats_dir = run_stats(args.model, str(corpus_dir), tokens=args.stats_tokens)
    tokenizer = load_tokenizer(args.model)
    common = dict(rounds=args.rounds, expert_steps=args.expert_steps,
                  batch_size=args.batch_size, block_size=args.block_size,
                  lr_router=args.lr_router, lr_experts=args.lr_experts,
                  kd_weight=args.kd_weight, eval_tokens=1024)

    runs = {}
    for method, router_steps in (("readme", args.router_steps), ("prune", 0)):
        moe = work / f"moe-{method}"
        if not (moe / "plan").is_dir():
            run_refactor(args.model, str(corpus_dir), moe, method=method, stats_dir=stats_dir)
        out = work / f"train-{method}"
        config = TrainConfig(router_steps=router_steps, **common)
        state = Trainer(moe, str(corpus_dir), out, config).run()
        runs[method] = {"dir": str(final_model_dir(out)), "state": state,
                        "untrained": str(moe)}

    variants = [(args.model, "dense", "router"),
                (runs["readme"]["untrained"], "readme untrained (oracle)", "oracle"),
                (runs["readme"]["dir"], "readme trained (router)", "router"),
                (runs["readme"]["dir"], "readme trained (oracle)", "oracle"),
                (runs["prune"]["untrained"], "prune untrained", "router"),
                (runs["prune"]["dir"], "prune trained", "router")]
    reports = [evaluate_model(spec, label, tokenizer, corpus, max_tokens=args.eval_tokens,
                              routing=routing) for spec, label, routing in variants]
    trained = load_model(runs["readme"]["dir"])
    cost = [router_share(trained, batch) for batch in (1, 32)]
    last = runs["readme"]["state"]["rounds"][str(args.rounds - 1)]
    tokens = args.rounds * args.expert_steps * args.batch_size * args.block_size
    summary = {
        "command": command_line(),
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads, fp32",
        "model": args.model, "seconds": round(time.time() - started),
        "config": common | {"router_steps": args.router_steps},
        "expert_tuning_tokens": tokens,
        "router_tokens": args.rounds * args.router_steps * args.batch_size * args.block_size,
        "router_accuracy_per_round": [
            runs["readme"]["state"]["rounds"][str(r)]["router_accuracy"]["mean"]
            for r in range(args.rounds)],
        "router_accuracy_final": last["router_accuracy"],
        "router_cost": cost,
        "reports": reports,
        "readme_beats_prune": domain_wins(reports, "readme trained (router)", "prune trained"),
    }
    write_results(results, "train_quality", summary, render(summary))
    plot(runs, results / "train_quality.png")
    return 0


def render(summary: dict) -> str:
    wins = summary["readme_beats_prune"]
    acc = summary["router_accuracy_per_round"]
    cost_rows = [f"| {c['batch_size']} | {c['router_ms']:.2f} | {c['backbone_ms']:.1f} | "
                 f"{100 * c['share']:.2f}% |" for c in summary["router_cost"]]
    return "\n".join([
        "# Training quality: ReadME vs prune at equal active width and equal tokens", "",
        f"Command: `{summary['command']}`  ",
        f"Machine: {summary['machine']}; {summary['seconds']} s.  ",
        f"Both models tune their FFNs on {summary['expert_tuning_tokens']:,} tokens "
        f"(LM loss + KL to the dense model, weight {summary['config']['kd_weight']}); ReadME's "
        f"router additionally distils on {summary['router_tokens']:,} tokens with the backbone "
        f"frozen. Held-out perplexity, 512-token windows:", "",
        format_ppl_table(summary["reports"]), "",
        f"Trained ReadME (its own router) beats trained prune on {wins['count']} of "
        f"{wins['of']} domains ({', '.join(wins['domains']) or 'none'}).", "",
        "Router top-1 accuracy against the oracle label (held-out), per round: "
        + ", ".join(f"{100 * a:.1f}%" for a in acc) + ".", "",
        "Router cost in decoding (median step, router with its KV cache):", "",
        "| batch | router ms | backbone ms | router share |", "|---:|---:|---:|---:|",
        *cost_rows, "",
    ])


def plot(runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for method, run in runs.items():
        losses = [x for r in sorted(run["state"]["rounds"], key=int)
                  for x in run["state"]["rounds"][r]["experts"]["losses"]]
        left.plot(losses, label=f"{method} expert tuning")
    left.set_xlabel("expert step")
    left.set_ylabel("loss (LM + KD)")
    left.legend()
    rounds = runs["readme"]["state"]["rounds"]
    router = [x for r in sorted(rounds, key=int) for x in rounds[r].get("router", {})
              .get("losses", [])]
    right.plot(router, color="tab:green")
    right.set_xlabel("router step")
    right.set_ylabel("distillation loss")
    fig.tight_layout()
    atomic_save_figure(fig, path)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
