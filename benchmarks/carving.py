"""What better carving buys before any training: channel importance and dropped-channel
compensation, ReadME experts and the prune baseline alike, at the paper's active width.

Each variant is an (importance criterion, compensation) pair, compensation being none, the
mean-output bias, the least-squares refit of the kept down columns, or the refit with the
bias fitted in the same least-squares problem, each refit on the dense model's inputs or
sequentially on the carved model's own; for each, the ReadME experts
(oracle routing: each domain's tokens use its own expert) and the prune baseline (one mask) are
refactored from the same statistics and scored on the same held-out tokens as the dense model.
The number the quality issue judges is the mean over domains of log(ppl / dense ppl): the
log-perplexity gap. The first variant (the paper's activation criterion, no compensation) is
today's default, so every other row is measured against it in the same run.

Resumable: each scored model is kept as runs/carving/reports/<label>.json and its folder is
deleted once scored (a killed run rescores only what is missing; --fresh starts over).
Writes results/carving.{json,md}.

    .venv/bin/python benchmarks/carving.py [--stats-tokens 16384] [--eval-tokens 4096]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

from readmoe.data.corpus import build_corpus, load_corpus
from readmoe.eval.domains import domain_wins, evaluate_model, format_ppl_table, log_gap
from readmoe.io import atomic_write_json, command_line, write_results
from readmoe.models import load_tokenizer
from readmoe.refactor.importance import CRITERIA
from readmoe.refactor.pipeline import run_refactor, run_stats

# (importance criterion, what makes up for the dropped channels): nothing, the mean-output
# bias (--compensate), the least-squares refit of the kept down columns (--refit), or both
# (the bias fitted with the columns); each refit also sequential (--sequential: every layer
# fitted on the inputs the carved layers before it give it), to the dense FFN's output on them
# or (-layer: --refit-target layer) to the dense layer's output
VARIANTS = (("activation", "none"), ("activation", "bias"), ("weighted", "none"),
            ("contribution", "none"), ("contribution", "bias"), ("activation", "refit"),
            ("contribution", "refit"), ("activation", "refit+bias"),
            ("contribution", "refit+bias"), ("activation", "seqrefit"),
            ("contribution", "seqrefit"), ("activation", "seqrefit-layer"),
            ("contribution", "seqrefit-layer"))
FIX_LABELS = {"none": "", "bias": "+comp", "refit": "+refit", "refit+bias": "+refit+comp",
              "seqrefit": "+seqrefit", "seqrefit-layer": "+seqrefit-layer"}
METHODS = (("readme", "oracle"), ("prune", "router"))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--work", default="runs/carving")
    parser.add_argument("--results", default="results")
    parser.add_argument("--corpus-bytes", type=int, default=1_000_000)
    parser.add_argument("--stats-tokens", type=int, default=16384)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--importance", nargs="+", default=None, choices=CRITERIA,
                        help="only the variants with these criteria (default: all)")
    parser.add_argument("--compensation", nargs="+", default=None, choices=list(FIX_LABELS),
                        help="only the variants with these compensations (default: all)")
    parser.add_argument("--fresh", action="store_true", help="discard kept reports")
    return parser.parse_args()


def label_of(method: str, importance: str, fix: str) -> str:
    return f"{method}/{importance}{FIX_LABELS[fix]}"




def main() -> int:
    args = parse_args()
    work = Path(args.work)
    reports_dir = work / "reports"
    if args.fresh and reports_dir.is_dir():
        shutil.rmtree(reports_dir)
    reports_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    corpus_dir = work / "corpus"
    build_corpus(corpus_dir, max_bytes_per_domain=args.corpus_bytes, progress=False)
    corpus = load_corpus(corpus_dir)
    stats, stats_dir = run_stats(args.model, str(corpus_dir), work / "stats",
                                 tokens=args.stats_tokens)
    tokenizer = load_tokenizer(args.model)

    def scored(label: str, make_folder, routing: str) -> dict:
        path = reports_dir / f"{label.replace('/', '_')}.json"
        if path.is_file():
            return json.loads(path.read_text())
        folder = make_folder()
        report = evaluate_model(str(folder), label, tokenizer, corpus,
                                max_tokens=args.eval_tokens, routing=routing)
        atomic_write_json(path, report)
        if folder != args.model:
            shutil.rmtree(folder)
        return report

    dense = scored("dense", lambda: args.model, "router")
    variants = [v for v in VARIANTS if (args.importance is None or v[0] in args.importance)
                and (args.compensation is None or v[1] in args.compensation)]
    rows, reports = [], [dense]
    for importance, fix in variants:
        row = {"importance": importance, "fix": fix}
        for method, routing in METHODS:
            label = label_of(method, importance, fix)

            def make(method=method, importance=importance, fix=fix, label=label) -> Path:
                folder = work / ("moe-" + label.replace("/", "-"))
                run_refactor(args.model, str(corpus_dir), folder, method=method,
                             keep=args.keep, stats_dir=stats_dir, importance=importance,
                             compensate=fix.endswith("bias"), refit="refit" in fix,
                             sequential=fix.startswith("seq"),
                             refit_target="layer" if fix.endswith("-layer") else "ffn")
                return folder
            report = scored(label, make, routing)
            reports.append(report)
            row[f"{method}_log_gap"] = log_gap(report, dense)
        row["readme_beats_prune"] = domain_wins(
            reports, label_of("readme", importance, fix),
            label_of("prune", importance, fix))["count"]
        rows.append(row)
    baseline = rows[0]["readme_log_gap"] if rows and variants[0] == VARIANTS[0] else None
    for row in rows:
        row["readme_gap_vs_today"] = (row["readme_log_gap"] / baseline
                                      if baseline else None)
    summary = {"command": command_line(),
               "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads, fp32",
               "model": args.model, "keep": args.keep,
               "stats_tokens_per_domain": stats.tokens, "eval_tokens_per_domain":
               args.eval_tokens, "seconds": round(time.time() - started), "variants": rows,
               "reports": reports}
    write_results(Path(args.results), "carving", summary, render(summary))
    return 0


def render(summary: dict) -> str:
    lines = ["# Carving without training: importance criteria, compensation and refit", "",
             f"Command: `{summary['command']}`  ",
             f"Machine: {summary['machine']}; {summary['seconds']} s of this run (kept "
             "reports of a resumed run not counted).  ",
             f"Model {summary['model']}, keep {summary['keep']} (the paper's active width); "
             f"statistics {next(iter(summary['stats_tokens_per_domain'].values()))} tokens per "
             f"domain; perplexity on {summary['eval_tokens_per_domain']} held-out tokens per "
             "domain. ReadME with oracle routing (each domain's tokens use its own expert).", "",
             "Log-perplexity gap to dense (mean over the six domains of log(ppl / dense); "
             "lower is better; 'vs today' is the ReadME gap over that of the first row, the "
             "paper's criterion without compensation). Compensation: 'bias' adds the mean output "
             "of the dropped channels (--compensate); 'refit' refits the kept channels' down "
             "projection by least squares on the statistics' tokens (--refit); 'refit+bias' "
             "fits an output bias per expert (prune: per layer) in the same problem (--refit "
             "--compensate); 'seqrefit' fits each layer on the inputs the carved and refitted "
             "layers before it give it instead of the dense model's (--refit --sequential), "
             "'seqrefit-layer' to the dense layer's output rather than the dense FFN's "
             "(--refit-target layer):", "",
             "| importance | compensation | ReadME gap | vs today | prune gap | ReadME beats "
             "prune on |", "|---|---|---:|---:|---:|---:|"]
    for row in summary["variants"]:
        vs = row["readme_gap_vs_today"]
        lines.append(f"| {row['importance']} | {row['fix']} | "
                     f"{row['readme_log_gap']:.3f} | {'-' if vs is None else f'{vs:.2f}x'} | "
                     f"{row['prune_log_gap']:.3f} | {row['readme_beats_prune']} of 6 |")
    lines += ["", "Held-out perplexity per domain:", "", format_ppl_table(summary["reports"]),
              ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
