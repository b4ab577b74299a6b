"""`make demo`: the whole pipeline that exists so far, on the built-in model and corpora.

Steps (each cached or resumable, so a second run is quick): build the domain corpora,
summarise the dense model, compute activation statistics, carve the ReadME model and the
equal-width prune baseline, train both with a small budget (router distillation and expert
tuning for ReadME, the same expert-tuning tokens for prune), and compare held-out
perplexity per domain.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from readmoe.errors import ReadmoeError
from readmoe.models.builtin import DEFAULT_MODEL


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m readmoe.demo", description=__doc__)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--out", default="runs/demo", help="run folder (default runs/demo)")
    parser.add_argument("--corpus-bytes", type=int, default=1_000_000,
                        help="text bytes per domain in the built corpus")
    parser.add_argument("--stats-tokens", type=int, default=8192,
                        help="activation-statistics tokens per domain")
    parser.add_argument("--eval-tokens", type=int, default=2048,
                        help="held-out tokens per domain for perplexity")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--router-steps", type=int, default=10)
    parser.add_argument("--expert-steps", type=int, default=8)
    return parser.parse_args(argv)


def step(title: str) -> None:
    print(f"\n== {title}", flush=True)


class Demo:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.out = args, Path(args.out)
        self.reports: list[dict] = []

    def run(self) -> None:
        from readmoe.data.corpus import load_corpus
        from readmoe.models import load_tokenizer

        started = time.time()
        self.corpus_dir = self.out / "corpus"
        self.build_corpus()
        self.corpus = load_corpus(self.corpus_dir)
        self.tokenizer = load_tokenizer(self.args.model)
        self.evaluate(self.args.model, "dense")
        folders = self.refactor()
        self.train(folders)
        self.write_table()
        print(f"\ndemo finished in {time.time() - started:.0f} s; outputs in {self.out}/")

    def build_corpus(self) -> None:
        from readmoe.data.corpus import build_corpus
        from readmoe.models import model_info

        step(f"dense model {self.args.model}")
        print(json.dumps(model_info(self.args.model), indent=2))
        step("domain corpora")
        manifest = build_corpus(self.corpus_dir, max_bytes_per_domain=self.args.corpus_bytes)
        for name, entry in manifest["domains"].items():
            print(f"{name:>10}: {entry['documents']:5d} documents, {entry['bytes']:9,d} bytes")

    def evaluate(self, spec: str, label: str, routing: str = "router") -> None:
        from readmoe.eval.domains import domain_perplexity
        from readmoe.eval.routing import make_routing
        from readmoe.models import load_model

        step(f"held-out perplexity: {label}")
        model = load_model(str(spec))
        report = domain_perplexity(
            model, self.tokenizer, self.corpus, model_name=str(spec),
            max_tokens=self.args.eval_tokens,
            routing=make_routing(model, routing, model_dir=spec),
            extra={"label": label, "routing": routing})
        print(", ".join(f"{d} {v['ppl']:.1f}" for d, v in report["domains"].items()))
        self.reports.append(report)

    def refactor(self) -> dict[str, Path]:
        from readmoe.refactor.pipeline import run_refactor, run_stats

        step("activation statistics per domain")
        _, stats_dir = run_stats(self.args.model, str(self.corpus_dir), self.out / "stats",
                                 tokens=self.args.stats_tokens)
        folders = {}
        for method in ("readme", "prune"):
            step(f"refactor: {method}")
            folder = self.out / f"moe-{method}"
            plan = run_refactor(self.args.model, str(self.corpus_dir), folder, method=method,
                                stats_dir=stats_dir)
            active = plan.active_sizes()
            print(f"{plan.num_experts} routed expert(s) {plan.expert_names}; active FFN "
                  f"channels per token {min(active)}-{max(active)} of {plan.intermediate_size}")
            folders[method] = folder
        self.evaluate(folders["readme"], "readme+domain", "domain")
        self.evaluate(folders["readme"], "readme+oracle", "oracle")
        self.evaluate(folders["prune"], "prune")
        return folders

    def train(self, folders: dict[str, Path]) -> None:
        from readmoe.train.config import TrainConfig
        from readmoe.train.rounds import Trainer, final_model_dir

        a = self.args
        for method, router_steps in (("readme", a.router_steps), ("prune", 0)):
            step(f"train: {method} ({a.rounds} rounds, {router_steps} router + "
                 f"{a.expert_steps} expert steps each)")
            config = TrainConfig(rounds=a.rounds, router_steps=router_steps,
                                 expert_steps=a.expert_steps, batch_size=4, block_size=256,
                                 lr_router=2e-3, lr_experts=2e-4, kd_weight=1.0,
                                 eval_tokens=512)
            out = self.out / f"train-{method}"
            state = Trainer(folders[method], str(self.corpus_dir), out, config).run()
            last = state["rounds"][str(a.rounds - 1)]
            if "router_accuracy" in last:
                print(f"router accuracy vs oracle: {100 * last['router_accuracy']['mean']:.1f}%")
            label = "readme trained" if method == "readme" else "prune trained"
            self.evaluate(final_model_dir(out), label)

    def write_table(self) -> None:
        from readmoe.eval.domains import format_ppl_table
        from readmoe.io import atomic_write_json, atomic_write_text

        step("held-out perplexity per domain")
        atomic_write_json(self.out / "ppl.json", self.reports)
        table = format_ppl_table(self.reports)
        atomic_write_text(self.out / "ppl.md", table + "\n")
        print(table)


def main(argv: list[str] | None = None) -> int:
    try:
        Demo(parse_args(argv)).run()
    except ReadmoeError as exc:
        print(f"readmoe: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
