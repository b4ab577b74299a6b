"""How much each tuning recipe recovers at the demo's budget: ReadME and prune, same tokens.

Why: at the demo's budget (2 rounds, 8 expert steps of 4 x 256 tokens each) trained prune beats
trained ReadME on most domains although ReadME starts ahead. This sweeps the expert learning
rate (and KD on/off) on the demo's own untrained folders and scores every trained ReadME
twice, with its own router and with oracle routing, to tell router error from expert
recovery. Each cell is kept under runs/recovery/<cell>/ (trainer state resumes; a scored cell
is not rerun).

Writes results/recovery_sweep.{json,md}. Needs `make demo` first (runs/demo/moe-*).

    .venv/bin/python benchmarks/recovery_sweep.py [--lr-experts 2e-4 1e-3] [--kd 1.0]
        [--router-steps 10 40]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from readmoe.data.corpus import load_corpus
from readmoe.eval.domains import evaluate_model, format_ppl_table, log_gap
from readmoe.io import atomic_write_json, command_line, write_results
from readmoe.models import load_tokenizer
from readmoe.train.config import TrainConfig
from readmoe.train.rounds import Trainer, final_model_dir

DEMO = Path("runs/demo")
WORK = Path("runs/recovery")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lr-experts", type=float, nargs="+", default=[2e-4, 1e-3])
    parser.add_argument("--kd", type=float, nargs="+", default=[1.0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--router-steps", type=int, nargs="+", default=[10],
                        help="router steps per round for ReadME (each value a cell)")
    parser.add_argument("--expert-steps", type=int, default=8)
    parser.add_argument("--eval-tokens", type=int, default=2048)
    parser.add_argument("--results", default="results")
    return parser.parse_args()




def main() -> int:
    args = parse_args()
    if not (DEMO / "moe-readme").is_dir():
        raise SystemExit("no demo folders: run `make demo` first")
    started = time.time()
    corpus_dir = DEMO / "corpus"
    corpus, tokenizer = load_corpus(corpus_dir), load_tokenizer(str(DEMO / "moe-readme"))
    dense = next(r for r in json.loads((DEMO / "ppl.json").read_text()) if r["label"] == "dense")

    def scored(path: Path, spec: Path, label: str, routing: str) -> dict:
        if path.is_file():  # kept from an earlier run: labelled as this run names it
            return {**json.loads(path.read_text()), "label": label}
        report = evaluate_model(str(spec), label, tokenizer, corpus,
                                max_tokens=args.eval_tokens, routing=routing)
        atomic_write_json(path, report)
        return report

    rows, reports = [], [dense]
    for lr in args.lr_experts:
        for kd in args.kd:
            for method, router_steps in ([("readme", r) for r in args.router_steps]
                                         + [("prune", 0)]):
                cell = WORK / f"{method}-lr{lr:g}-kd{kd:g}-router{router_steps}"
                config = TrainConfig(rounds=args.rounds, router_steps=router_steps,
                                     expert_steps=args.expert_steps, batch_size=4,
                                     block_size=256, lr_router=2e-3, lr_experts=lr,
                                     kd_weight=kd, eval_tokens=512)
                if not (cell / "own.json").is_file():
                    Trainer(DEMO / f"moe-{method}", str(corpus_dir), cell / "train",
                            config).run()
                model = final_model_dir(cell / "train")
                label = f"{method} lr {lr:g} kd {kd:g}" + (
                    f" router {router_steps}" if router_steps else "")
                own = scored(cell / "own.json", model, label, "router")
                reports.append(own)
                row = {"method": method, "lr_experts": lr, "kd_weight": kd,
                       "router_steps": router_steps,
                       "log_gap": log_gap(own, dense)}
                if method == "readme":
                    oracle = scored(cell / "oracle.json", model, label + " oracle", "oracle")
                    reports.append(oracle)
                    row["log_gap_oracle"] = log_gap(oracle, dense)
                rows.append(row)
    summary = {"command": command_line(),
               "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads, fp32",
               "budget": {"rounds": args.rounds, "expert_steps": args.expert_steps,
                          "tokens_per_step": 4 * 256},
               "seconds": round(time.time() - started), "rows": rows, "reports": reports}
    write_results(Path(args.results), "recovery_sweep", summary, render(summary))
    return 0


def render(summary: dict) -> str:
    budget = summary["budget"]
    lines = ["# Recovery at the demo's budget: expert learning rate and KD", "",
             f"Command: `{summary['command']}`; {summary['machine']}; {summary['seconds']} s "
             "of this run.  ",
             f"Budget: {budget['rounds']} rounds of router steps (ReadME only, per row) "
             f"+ {budget['expert_steps']} expert steps of {budget['tokens_per_step']} tokens, "
             "from the demo's untrained folders; held-out perplexity on the demo's tokens.", "",
             "Log-perplexity gap to dense (mean over domains of log(ppl / dense); lower is "
             "better):", "", "| method | lr experts | KD weight | router steps per round | "
             "gap, own router | gap, oracle routing |", "|---|---:|---:|---:|---:|---:|"]
    for row in summary["rows"]:
        oracle = row.get("log_gap_oracle")
        lines.append(f"| {row['method']} | {row['lr_experts']:g} | {row['kd_weight']:g} | "
                     f"{row['router_steps']} | {row['log_gap']:.3f} | "
                     f"{'-' if oracle is None else f'{oracle:.3f}'} |")
    lines += ["", format_ppl_table(summary["reports"]), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
