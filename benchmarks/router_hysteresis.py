"""What routing hysteresis costs in quality and buys in locality, on a trained ReadME model.

Why: the expert cache lives on temporal locality (a request that keeps its expert keeps the
cache warm), and a router trained towards the per-token oracle switches on small logit margins
(results/router_locality-demo.md). ``config.router_hysteresis`` keeps the previous token's
expert unless the router's best logit beats it by more than the margin. For each margin: the
held-out perplexity per domain with the model routing itself (the rule runs inside the model, as
in serving), the router's temporal locality on the same windows (share of tokens routed as the
token before them), and the domains won against the trained prune model. ``readmoe train``
chooses the margin a model ships with by the same rule on train text no step used
(``readmoe.train.hysteresis``); this benchmark reports the held-out side of every margin, and
its own pick (the lowest mean held-out perplexity, ties: the larger margin, on the windows it
is reported on: a mild selection effect) is what ``--write`` saves for serving experiments
(benchmarks/codesign.py on that folder). The model's own margin is ignored here.

Writes results/<NAME>.{json,md}. Needs ``make demo`` (its trained ReadME and prune models).

    .venv/bin/python benchmarks/router_hysteresis.py [--margins 0 0.25 0.5 0.75 1]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

import torch

from readmoe.analysis.information import reuse_share
from readmoe.data.corpus import load_corpus
from readmoe.eval.domains import domain_perplexity, domain_wins, heldout_blocks
from readmoe.io import atomic_write_json, command_line, write_results
from readmoe.models import load_model, load_tokenizer
from readmoe.train.rounds import final_model_dir


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="trained ReadME folder (default: the "
                        "demo's last round)")
    parser.add_argument("--prune", default=None, help="trained prune folder (default: the "
                        "demo's)")
    parser.add_argument("--corpus", default="runs/demo/corpus")
    parser.add_argument("--margins", type=float, nargs="+", default=[0, 0.25, 0.5, 0.75, 1])
    parser.add_argument("--eval-tokens", type=int, default=2048, help="held-out, per domain")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--write", default=None, help="save a copy of the model folder with the "
                        "chosen margin in its config.json here")
    parser.add_argument("--results", default="results")
    parser.add_argument("--name", default="router_hysteresis")
    return parser.parse_args()


def locality(model, blocks: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per domain: the share of held-out tokens routed as the token before them."""
    out = {}
    with torch.no_grad():
        for domain, block in blocks.items():
            out[domain] = reuse_share(model.route(block)[0].cpu().numpy())
    return out


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    readme = Path(args.model) if args.model else final_model_dir("runs/demo/train-readme")
    prune_dir = Path(args.prune) if args.prune else final_model_dir("runs/demo/train-prune")
    started = time.time()
    tokenizer, corpus = load_tokenizer(str(readme)), load_corpus(args.corpus)
    model = load_model(str(readme))
    blocks = {d: heldout_blocks(corpus, tokenizer, d, max_tokens=args.eval_tokens)
              for d in corpus.domains}
    prune = domain_perplexity(load_model(str(prune_dir)), tokenizer, corpus,
                              model_name=str(prune_dir), max_tokens=args.eval_tokens,
                              extra={"label": "prune"})
    rows = []
    for margin in sorted(set(args.margins)):
        model.config.router_hysteresis = margin
        report = domain_perplexity(model, tokenizer, corpus, model_name=str(readme),
                                   max_tokens=args.eval_tokens,
                                   extra={"label": f"readme, margin {margin:g}"})
        rows.append({"margin": margin, "ppl": report,
                     "mean_ppl": mean(r["ppl"] for r in report["domains"].values()),
                     "locality": locality(model, blocks),
                     "wins_over_prune": domain_wins([report, prune], report["label"], "prune")})
        print(f"margin {margin:g}: mean ppl {rows[-1]['mean_ppl']:.2f}, locality "
              f"{mean(rows[-1]['locality'].values()):.1%}", flush=True)
    chosen = min(rows, key=lambda r: (r["mean_ppl"], -r["margin"]))["margin"]
    if args.write:
        out = Path(args.write)
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(readme, out, ignore=shutil.ignore_patterns("training.pt"))
        config = json.loads((out / "config.json").read_text())
        atomic_write_json(out / "config.json", {**config, "router_hysteresis": chosen})
    summary = {"command": command_line(), "machine": f"{platform.machine()} cpu, "
               f"{args.threads} threads, fp32", "seconds": round(time.time() - started),
               "readme": str(readme), "prune": str(prune_dir), "chosen_margin": chosen,
               "written": args.write,
               "prune_ppl": prune, "rows": rows}
    write_results(args.results, args.name, summary, render(summary))
    return 0


def render(summary: dict) -> str:
    domains = list(summary["prune_ppl"]["domains"])
    prune = summary["prune_ppl"]["domains"]
    lines = ["# Routing hysteresis: quality against locality", "",
             f"Command: `{summary['command']}`; {summary['machine']}; {summary['seconds']} s. "
             f"Model {summary['readme']}, prune {summary['prune']}. Cells: held-out perplexity "
             "(the model routing itself) / locality (share of tokens routed as the token before "
             "them). Chosen margin (the lowest mean perplexity): "
             f"{summary['chosen_margin']:g}.", "",
             "| margin | " + " | ".join(domains) + " | mean ppl | mean locality | beats prune on |",
             "|---:|" + "---:|" * (len(domains) + 3)]
    lines.append("| prune | " + " | ".join(f"{prune[d]['ppl']:.1f}" for d in domains)
                 + f" | {mean(prune[d]['ppl'] for d in domains):.1f} | - | - |")
    for row in summary["rows"]:
        ppl, loc, wins = row["ppl"]["domains"], row["locality"], row["wins_over_prune"]
        lines.append(f"| {row['margin']:g} | "
                     + " | ".join(f"{ppl[d]['ppl']:.1f} / {loc[d]:.0%}" for d in domains)
                     + f" | {row['mean_ppl']:.2f} | {mean(loc.values()):.1%} | "
                     f"{wins['count']} of {wins['of']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
