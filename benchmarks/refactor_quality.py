"""Per-domain held-out perplexity of the dense model against its ReadME refactorings.

Compares, at equal active FFN width (no training): dense; `readme` with oracle routing and
with domain routing; `cluster` and `random` experts with oracle routing; and the `prune`
baseline (one mask, no routing), every one ranked by the same --importance criterion.
Writes results/refactor_quality.{json,md,png} (pass --results DIR to keep another
criterion's results apart).

    .venv/bin/python benchmarks/refactor_quality.py [--stats-tokens 16384] [--eval-tokens 4096]
        [--importance activation|weighted|contribution]
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
from readmoe.io import atomic_save_figure, command_line, write_results
from readmoe.models import load_tokenizer
from readmoe.refactor.importance import CRITERIA, DEFAULT_CRITERION
from readmoe.refactor.pipeline import run_refactor, run_stats

VARIANTS = [  # (label, method, routing)
    ("readme+oracle", "readme", "oracle"),
    ("readme+domain", "readme", "domain"),
    ("cluster+oracle", "cluster", "oracle"),
    ("random+oracle", "random", "oracle"),
    ("prune", "prune", "router"),
]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--work", default="runs/bench", help="corpus and model folders")
    parser.add_argument("--results", default="results")
    parser.add_argument("--corpus-bytes", type=int, default=1_000_000)
    parser.add_argument("--stats-tokens", type=int, default=16384)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--importance", default=DEFAULT_CRITERION, choices=CRITERIA)
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    work, results = Path(args.work), Path(args.results)
    started = time.time()
    corpus_dir = work / "corpus"
    build_corpus(corpus_dir, max_bytes_per_domain=args.corpus_bytes, progress=False)
    corpus = load_corpus(corpus_dir)
    stats, stats_dir = run_stats(args.model, str(corpus_dir), tokens=args.stats_tokens)
    tokenizer = load_tokenizer(args.model)


    reports = [evaluate_model(args.model, "dense", tokenizer, corpus,
                              max_tokens=args.eval_tokens)]
    plans = {}
    # another criterion's models get their own folders (train_quality.py reuses moe-<method>)
    tag = "" if args.importance == DEFAULT_CRITERION else f"-{args.importance}"
    for label, method, routing in VARIANTS:
        folder = work / f"moe-{method}{tag}"
        if method not in plans:
            plans[method] = run_refactor(args.model, str(corpus_dir), folder, method=method,
                                         keep=args.keep, stats_dir=stats_dir,
                                         importance=args.importance)
        reports.append(evaluate_model(str(folder), label, tokenizer, corpus,
                                      max_tokens=args.eval_tokens, routing=routing))

    readme = plans["readme"]
    summary = {
        "command": command_line(),
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads, fp32",
        "model": args.model, "keep": args.keep, "importance": args.importance,
        "stats_tokens_per_domain": stats.tokens,
        "eval_tokens_per_domain": args.eval_tokens, "seconds": round(time.time() - started),
        "active_ffn_channels_per_layer": readme.active_sizes(),
        "shared_channels_per_layer": [lp.shared_size for lp in readme.layers],
        "expert_channels_per_layer": [lp.expert_size for lp in readme.layers],
        "dense_ffn_channels": readme.intermediate_size,
        "reports": reports,
        "readme_oracle_beats_prune": domain_wins(reports, "readme+oracle", "prune"),
    }
    write_results(results, "refactor_quality", summary, render_markdown(summary))
    plot(summary, results / "refactor_quality.png")
    return 0


def render_markdown(summary: dict) -> str:
    shared = summary["shared_channels_per_layer"]
    expert = summary["expert_channels_per_layer"]
    dense = summary["dense_ffn_channels"]
    wins = summary["readme_oracle_beats_prune"]
    return "\n".join([
        "# Refactor quality (no training)",
        "",
        f"Command: `{summary['command']}`  ",
        f"Machine: {summary['machine']}; {summary['seconds']} s.  ",
        f"Model {summary['model']}, keep {summary['keep']}, channel importance "
        f"{summary['importance']}: every variant uses "
        f"{summary['active_ffn_channels_per_layer'][0]} of {dense} FFN channels per token "
        f"(shared {min(shared)}-{max(shared)} + routed {min(expert)}-{max(expert)} per layer). "
        f"Statistics: {next(iter(summary['stats_tokens_per_domain'].values()))} tokens per "
        f"domain; perplexity on {summary['eval_tokens_per_domain']} held-out tokens per domain "
        "(512-token windows).",
        "",
        "Held-out perplexity per domain (lower is better):",
        "",
        format_ppl_table(summary["reports"]),
        "",
        f"readme+oracle beats prune at equal active width on {wins['count']} of "
        f"{wins['of']} domains ({', '.join(wins['domains']) or 'none'}).",
        "",
    ])


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reports = summary["reports"]
    domains = sorted(reports[0]["domains"])
    width = 0.8 / len(reports)
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for i, report in enumerate(reports):
        values = [report["domains"][d]["ppl"] for d in domains]
        ax.bar([x + i * width for x in range(len(domains))], values, width,
               label=report["label"])
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(domains))], domains)
    ax.set_yscale("log")
    ax.set_ylabel("held-out perplexity (log)")
    ax.set_title(f"{summary['model']}: dense vs refactorings at equal active width")
    ax.legend(fontsize=8, ncol=3)
    fig.tight_layout()
    atomic_save_figure(fig, path)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
