"""Held-out perplexity against tuning tokens: ReadME and prune, same recipe, same tokens.

Why one run per method: Read-ME tunes in rounds (router steps, then expert steps), so a budget
is a number of rounds. Each method trains once to the largest budget; its ``round-<r>/`` folder
is the model after ``r + 1`` rounds, which is what a run stopped at that budget would have
kept (any learning-rate decay is per round, not over a planned total). Both methods start from
the demo's untrained folders and read the same blocks in the same order (the trainer's seeded
schedule), so at every budget they have seen the same expert-tuning tokens; ReadME also
spends ``router_steps`` per round on its router, and ``--final-router-steps`` after its last
round, as ``readmoe train`` ends a run (experts fixed): each kept round is finished with the
trainer's own ``final_router_phase`` into ``--work``/readme-<rounds>-final/. One difference from
a run of that many rounds, named here: the phase wraps around the long run's target blocks,
where a shorter run would have had fewer (``rounds * router_steps * batch`` of them).

Scored at every budget on the demo corpus's held-out text: ReadME with its own router and with
oracle routing (router error vs expert recovery), and prune. Resumable: trainer state resumes
after a kill, and each scored model is kept under ``--work``.

Writes results/quality_curve.{json,md,png}. Needs `make demo` first (runs/demo). On a GPU the
same command trains there (the trainer picks it); raise ``--rounds`` and ``--expert-steps``.

    .venv/bin/python benchmarks/quality_curve.py [--rounds 1 2 4 8 16] [--expert-steps 8]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from readmoe.data.corpus import load_corpus
from readmoe.errors import ReadmoeError
from readmoe.eval.domains import domain_perplexity, domain_wins, log_gap
from readmoe.eval.routing_modes import make_routing
from readmoe.io import atomic_write_json, command_line, write_results
from readmoe.models import load_model, load_tokenizer
from readmoe.models.device import resolve_placement
from readmoe.refactor.plan import ExpertPlan
from readmoe.refactor.slicing import save_readme
from readmoe.train.config import RECIPES, TrainConfig
from readmoe.train.rounds import Trainer, final_router_phase
from readmoe.train.targets import DistillTargets

SMALL = RECIPES["small"]  # the recipe `readmoe train` picks for this model


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", default="runs/demo", help="the demo's run folder")
    parser.add_argument("--work", default=None, help="default runs/<NAME>")
    parser.add_argument("--tag", default="", help="start from the demo's moe-<method><TAG> "
                        "folders, e.g. -refit from `python -m readmoe.demo --refit`")
    parser.add_argument("--rounds", type=int, nargs="+", default=[1, 2, 4, 8, 16],
                        help="budgets, as rounds of tuning (at least 4 for a curve)")
    parser.add_argument("--router-steps", type=int, default=40, help="ReadME, per round")
    parser.add_argument("--expert-steps", type=int, default=8, help="per round")
    parser.add_argument("--final-router-steps", type=int, default=SMALL.final_router_steps,
                        help="ReadME, after the last round (0: none)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--lr-router", type=float, default=SMALL.lr_router)
    parser.add_argument("--lr-experts", type=float, default=SMALL.lr_experts)
    parser.add_argument("--kd", type=float, default=SMALL.kd_weight, help="weight of the KD loss")
    parser.add_argument("--decay", type=float, default=SMALL.decay,
                        help="both learning rates are multiplied by this after every round "
                        "(the paper's 0.8 starves the late rounds of a small budget)")
    parser.add_argument("--eval-tokens", type=int, default=2048, help="held-out, per domain")
    parser.add_argument("--device", default=None, help="default: cuda if torch sees one")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--results", default="results")
    parser.add_argument("--name", default=None, help="results/<NAME>.{json,md,png}; default "
                        "quality_curve<TAG>")
    return parser.parse_args()


def tokens_per_round(args: argparse.Namespace) -> int:
    return args.expert_steps * args.batch_size * args.block_size


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    name = args.name or f"quality_curve{args.tag}"  # a tag never overwrites the untagged one
    demo, work = Path(args.demo), Path(args.work or f"runs/{name}")
    budgets = sorted(set(args.rounds))
    if budgets[0] < 1:
        raise ReadmoeError("--rounds: every budget is at least 1 round")
    missing = [p for p in (f"moe-readme{args.tag}", f"moe-prune{args.tag}", "corpus", "ppl.json")
               if not (demo / p).exists()]
    if missing:
        raise ReadmoeError(f"{demo} lacks {', '.join(missing)}: run `make demo` first")
    placement = resolve_placement(args.device)
    started = time.time()
    corpus_dir = demo / "corpus"
    corpus, tokenizer = load_corpus(corpus_dir), load_tokenizer(str(demo / "moe-readme"))
    dense = next(r for r in json.loads((demo / "ppl.json").read_text())
                 if r["label"] == "dense")
    if dense["max_tokens"] != args.eval_tokens:
        raise ReadmoeError(f"the demo scored dense on {dense['max_tokens']} held-out tokens per "
                           f"domain; score these on the same: --eval-tokens {dense['max_tokens']}")

    def score(model_dir: Path, label: str, routing: str, path: Path) -> dict:
        if path.is_file():
            return {**json.loads(path.read_text()), "label": label}
        model = load_model(str(model_dir), device=placement.device)
        report = domain_perplexity(model, tokenizer, corpus, model_name=str(model_dir),
                                   max_tokens=args.eval_tokens,
                                   routing=make_routing(model, routing, model_dir=model_dir),
                                   extra={"label": label, "routing": routing})
        atomic_write_json(path, report)
        print(f"{label}: mean ppl {mean_ppl(report):.1f}", flush=True)
        return report

    def finish(config: TrainConfig, rounds: int, train: Path) -> Path:
        """The kept round ``rounds - 1`` finished as a run of ``rounds`` rounds ends."""
        folder = work / f"readme-{rounds}-final{args.final_router_steps}"
        if (folder / "config.json").is_file():
            return folder
        round_dir = train / f"round-{rounds - 1}"
        model = load_model(str(round_dir), device=placement.device)
        torch.manual_seed(config.seed)
        finished = replace(config, rounds=rounds, final_router_steps=args.final_router_steps)
        final_router_phase(model, DistillTargets.load(train / "targets"), finished,
                           precision=placement.autocast)
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        save_readme(model, partial, tokenizer=tokenizer,
                    plan=ExpertPlan.load(round_dir / "plan"))
        partial.rename(folder)
        return folder

    points = []
    for method, router_steps in (("readme", args.router_steps), ("prune", 0)):
        config = TrainConfig(rounds=budgets[-1], router_steps=router_steps,
                             expert_steps=args.expert_steps, batch_size=args.batch_size,
                             block_size=args.block_size, lr_router=args.lr_router,
                             lr_experts=args.lr_experts, kd_weight=args.kd, decay=args.decay,
                             eval_tokens=512)
        train = work / f"train-{method}"
        Trainer(demo / f"moe-{method}{args.tag}", str(corpus_dir), train, config,
                placement=placement).run()
        for rounds in budgets:
            model_dir = train / f"round-{rounds - 1}"
            final = args.final_router_steps if method == "readme" else 0
            point = {"method": method, "rounds": rounds,
                     "tokens": rounds * tokens_per_round(args),
                     "router_tokens": (rounds * router_steps + final) * args.batch_size
                     * args.block_size,
                     "own": score(model_dir, f"{method} {rounds}r", "router",
                                  work / f"{method}-{rounds}-own.json")}
            if final:
                point["own_rounds_only"] = point["own"]
                point["own"] = score(finish(config, rounds, train),
                                     f"{method} {rounds}r +{final} router", "router",
                                     work / f"{method}-{rounds}-final{final}-own.json")
            if method == "readme":
                point["oracle"] = score(model_dir, f"{method} {rounds}r oracle", "oracle",
                                        work / f"{method}-{rounds}-oracle.json")
            points.append(point)
    summary = {"command": command_line(),
               "machine": f"{platform.machine()} {placement.device}, {args.threads} threads, "
                          "fp32",
               "recipe": {k: getattr(args, k) for k in ("router_steps", "expert_steps",
                                                        "final_router_steps", "batch_size",
                                                        "block_size", "lr_router",
                                                        "lr_experts", "kd", "decay")},
               "sources": [f"moe-readme{args.tag}", f"moe-prune{args.tag}"],
               "seconds": round(time.time() - started), "dense": dense,
               "budgets": [summarize(points, rounds, dense) for rounds in budgets],
               "points": points}
    write_results(args.results, name, summary, render(summary))
    plot(summary, Path(args.results) / f"{name}.png")
    return 0


def mean_ppl(report: dict) -> float:
    values = [v["ppl"] for v in report["domains"].values()]
    return sum(values) / len(values)


def summarize(points: list[dict], rounds: int, dense: dict) -> dict:
    """One budget: mean perplexity, gap to dense and wins of ReadME over prune."""
    readme = next(p for p in points if p["method"] == "readme" and p["rounds"] == rounds)
    prune = next(p for p in points if p["method"] == "prune" and p["rounds"] == rounds)
    own, oracle, pruned = readme["own"], readme["oracle"], prune["own"]
    wins = domain_wins([{**own, "label": "a"}, {**pruned, "label": "b"}], "a", "b")
    rounds_only = readme.get("own_rounds_only", own)
    return {"rounds": rounds, "tokens": readme["tokens"],
            "mean_ppl": {"dense": mean_ppl(dense), "readme": mean_ppl(own),
                         "readme_rounds_only": mean_ppl(rounds_only),
                         "readme_oracle": mean_ppl(oracle), "prune": mean_ppl(pruned)},
            "readme_rounds_only_wins": domain_wins(
                [{**rounds_only, "label": "a"}, {**pruned, "label": "b"}], "a", "b")["count"],
            "x_dense": mean_ppl(own) / mean_ppl(dense),
            "log_gap": {"readme": log_gap(own, dense), "readme_oracle": log_gap(oracle, dense),
                        "prune": log_gap(pruned, dense)},
            "readme_wins": wins}


def render(summary: dict) -> str:
    recipe = summary["recipe"]
    lines = ["# Held-out perplexity vs tuning tokens: ReadME and prune, same tokens", "",
             f"Command: `{summary['command']}`; {summary['machine']}; {summary['seconds']} s "
             "of this run.  ",
             f"Recipe per round: ReadME {recipe['router_steps']} router steps (lr "
             f"{recipe['lr_router']:g}), then both {recipe['expert_steps']} expert steps of "
             f"{recipe['batch_size']} x {recipe['block_size']} tokens (lr "
             f"{recipe['lr_experts']:g}, KD weight {recipe['kd']:g}; both rates times "
             f"{recipe['decay']:g} after every round), ReadME then "
             f"{recipe.get('final_router_steps', 0)} router steps with experts fixed (the "
             "column 'rounds only' leaves them out); from the demo's untrained "
             f"folders {' and '.join(summary.get('sources', ['moe-readme', 'moe-prune']))}. "
             "Perplexity: mean over the six domains' held-out text.", "",
             "| rounds | expert-tuning tokens | dense | ReadME (own router) | ReadME (rounds "
             "only) | ReadME (oracle) | prune | ReadME / dense | log gap ReadME / prune | "
             "ReadME beats prune on | rounds only beat prune on |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for b in summary["budgets"]:
        ppl, gap, wins = b["mean_ppl"], b["log_gap"], b["readme_wins"]
        lines.append(f"| {b['rounds']} | {b['tokens']:,} | {ppl['dense']:.1f} | "
                     f"{ppl['readme']:.1f} | {ppl['readme_rounds_only']:.1f} | "
                     f"{ppl['readme_oracle']:.1f} | {ppl['prune']:.1f} | "
                     f"{b['x_dense']:.2f}x | {gap['readme']:.3f} / {gap['prune']:.3f} | "
                     f"{wins['count']} of {wins['of']} | {b['readme_rounds_only_wins']} of "
                     f"{wins['of']} |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = summary["budgets"]
    tokens = [b["tokens"] for b in budgets]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label, style in (("readme", "ReadME, own router", "o-"),
                              ("readme_rounds_only", "ReadME, rounds only", "o:"),
                              ("readme_oracle", "ReadME, oracle routing", "o--"),
                              ("prune", "prune", "s-")):
        ax.plot(tokens, [b["mean_ppl"][key] for b in budgets], style, label=label)
    ax.axhline(budgets[0]["mean_ppl"]["dense"], color="gray", ls=":", label="dense")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("expert-tuning tokens")
    ax.set_ylabel("mean held-out perplexity")
    ax.set_title(f"Recovery per token ({summary['machine']})", fontsize=9)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
