"""`make demo`: the whole pipeline that exists so far, on the built-in model and corpora.

Steps (each cached or resumable, so a second run is quick): build the domain corpora,
summarise the dense model, compute activation statistics, carve the ReadME model and the
equal-width prune baseline, train both with a small budget (router distillation and expert
tuning for ReadME, the same expert-tuning tokens for prune), compare held-out perplexity per
domain, analyse the trained router (layer redundancy, temporal locality, domain x expert),
make a short quality table (parameters, perplexity, lm-eval tasks), and end by serving the
trained ReadME model with the engine: a short synthetic workload with every expert resident,
then with half the routed experts' bytes in fast memory behind an emulated link, once without
using the router's foresight (readme-lru) and once with it (readme-codesign); and last,
`readmoe serve` on the trained model on a free local port, asked one chat question through
the official `openai` client (streamed), then shut down with SIGTERM (it must exit 0).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from readmoe.cli.refactor_cmds import add_importance_arg
from readmoe.errors import ReadmoeError
from readmoe.models.builtin import DEFAULT_MODEL

# The demo carves the way that kept the most of the dense model in results/carving.md: channels
# ranked by their expected squared contribution, the kept down projection refitted by least
# squares (untrained log-perplexity gap 0.86 against the paper's criterion's 1.70). The
# `readmoe refactor` defaults stay the paper's.
DEMO_IMPORTANCE = "contribution"
DEMO_REFIT = True
DEMO_SEQUENTIAL = False


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m readmoe.demo", description=__doc__)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--out", default="runs/demo", help="run folder (default runs/demo)")
    parser.add_argument("--corpus-bytes", type=int, default=1_000_000,
                        help="text bytes per domain in the built corpus")
    parser.add_argument("--stats-tokens", type=int, default=8192,
                        help="activation-statistics tokens per domain")
    parser.add_argument("--recompute-stats", action="store_true",
                        help="recompute OUT/stats (else statistics made from another model, "
                        "corpus or token count are refused)")
    add_importance_arg(parser, default=DEMO_IMPORTANCE)
    parser.add_argument("--refit", action=argparse.BooleanOptionalAction, default=DEMO_REFIT,
                        help="refit the kept channels' down projection by least squares "
                        "(`readmoe refactor --refit`), ReadME and prune alike (default on)")
    parser.add_argument("--sequential", action=argparse.BooleanOptionalAction,
                        default=DEMO_SEQUENTIAL, help="with --refit, fit each layer on the "
                        "carved model's own inputs (`readmoe refactor --refit --sequential`; "
                        f"default {'on' if DEMO_SEQUENTIAL else 'off'})")
    parser.add_argument("--eval-tokens", type=int, default=2048,
                        help="held-out tokens per domain for perplexity")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--router-steps", type=int, default=40,
                        help="router steps per round (10 left the router the bottleneck: "
                        "results/recovery_sweep.md)")
    parser.add_argument("--expert-steps", type=int, default=8)
    parser.add_argument("--final-router-steps", type=int, default=None,
                        help="ReadME's router steps after the last round (default: the "
                        "recipe's; results/router_budget-demo.md)")
    parser.add_argument("--task-limit", type=int, default=20,
                        help="items per lm-eval task in the quality table")
    parser.add_argument("--serve-requests", type=int, default=16,
                        help="requests in the serving runs (1.5 per second, outputs <= 32)")
    return parser.parse_args(argv)


def step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def carving_tag(importance: str, refit: bool, sequential: bool = DEMO_SEQUENTIAL) -> str:
    """The suffix of the demo's model and training folders: empty for the demo's own carving,
    else naming criterion and refit. Training resumes by folder and must never continue a
    model carved another way."""
    if (importance, refit, sequential and refit) == (DEMO_IMPORTANCE, DEMO_REFIT,
                                                     DEMO_SEQUENTIAL and DEMO_REFIT):
        return ""
    return f"-{importance}" + ("-seqrefit" if refit and sequential else
                               "-refit" if refit else "")


def set_aside_stale_run(out: Path, moe_dir: Path, config: dict | None = None) -> None:
    """Rename a training folder begun on other source weights (an older demo's carving) or,
    given ``config``, with other training settings (an older default recipe) to
    ``<out>-stale-<n>``, so the demo trains afresh without deleting anyone's run."""
    from readmoe.train.rounds import stale_run_reason

    why = stale_run_reason(out, moe_dir, config)
    if why is None:
        return
    n = 1
    while out.with_name(f"{out.name}-stale-{n}").exists():
        n += 1
    stale = out.with_name(f"{out.name}-stale-{n}")
    out.rename(stale)
    targets = stale / "targets"
    if (targets / "targets.json").is_file() and "plan_tensors" in json.loads(
            (targets / "targets.json").read_text()):  # the trainer checks they still apply
        shutil.copytree(targets, out / "targets")
    print(f"{out} holds a run with another {why}; moved it to {stale} and training "
          "afresh")


class Demo:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.out = args, Path(args.out)
        self.reports: list[dict] = []
        self.tag = carving_tag(args.importance, args.refit, args.sequential)

    def run(self) -> None:
        from readmoe.data.corpus import load_corpus
        from readmoe.models import load_tokenizer

        started = time.time()
        self.corpus_dir = self.out / "corpus"
        self.build_corpus()
        self.corpus = load_corpus(self.corpus_dir)
        self.tokenizer = load_tokenizer(self.args.model)
        self.stats()  # first: reused statistics are checked before any long step
        self.evaluate(self.args.model, "dense")
        folders = self.refactor()
        trained = self.train(folders)
        self.write_table()
        self.analyze(trained["readme"])
        self.quality(trained)
        self.serve(trained["readme"])
        self.serve_http(trained["readme"])
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
        from readmoe.eval.routing_modes import make_routing
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

    def stats(self) -> None:
        from readmoe.refactor.importance import check_criterion
        from readmoe.refactor.pipeline import run_stats

        step("activation statistics per domain")
        stats, self.stats_dir = run_stats(self.args.model, str(self.corpus_dir),
                                          self.out / "stats", tokens=self.args.stats_tokens,
                                          recompute=self.args.recompute_stats)
        try:
            check_criterion(self.args.importance, stats)
        except ReadmoeError as exc:  # the demo's own folder, from an older readmoe
            print(f"{exc}\nrecomputing the demo's statistics in {self.stats_dir}")
            stats, _ = run_stats(self.args.model, str(self.corpus_dir), self.stats_dir,
                                 tokens=self.args.stats_tokens, recompute=True)
            check_criterion(self.args.importance, stats)

    def refactor(self) -> dict[str, Path]:
        from readmoe.refactor.pipeline import run_refactor

        folders = {}
        for method in ("readme", "prune"):
            step(f"refactor: {method}")
            folder = self.out / f"moe-{method}{self.tag}"
            plan = run_refactor(self.args.model, str(self.corpus_dir), folder, method=method,
                                stats_dir=self.stats_dir, tokens=self.args.stats_tokens,
                                importance=self.args.importance, refit=self.args.refit,
                                sequential=self.args.refit and self.args.sequential)
            active = plan.active_sizes()
            print(f"{plan.num_experts} routed expert(s) {plan.expert_names}; active FFN "
                  f"channels per token {min(active)}-{max(active)} of {plan.intermediate_size}")
            folders[method] = folder
        self.evaluate(folders["readme"], "readme+domain", "domain")
        self.evaluate(folders["readme"], "readme+oracle", "oracle")
        self.evaluate(folders["prune"], "prune")
        return folders

    def train(self, folders: dict[str, Path]) -> dict[str, Path]:
        from readmoe.models import load_config
        from readmoe.train.config import TrainConfig, recipe_for
        from readmoe.train.rounds import Trainer, final_model_dir

        a = self.args
        trained = {}
        for method, router_steps in (("readme", a.router_steps), ("prune", 0)):
            name, recipe = recipe_for("auto", load_config(str(folders[method])))
            final = 0 if method == "prune" else (recipe.final_router_steps
                                                 if a.final_router_steps is None
                                                 else a.final_router_steps)
            step(f"train: {method} ({a.rounds} rounds, {router_steps} router + "
                 f"{a.expert_steps} expert steps each, then {final} router steps, "
                 f"recipe {name})")
            config = TrainConfig(rounds=a.rounds, router_steps=router_steps,
                                 expert_steps=a.expert_steps, final_router_steps=final,
                                 batch_size=4, block_size=256,
                                 lr_router=recipe.lr_router, lr_experts=recipe.lr_experts,
                                 decay=recipe.decay, kd_weight=recipe.kd_weight,
                                 eval_tokens=512)
            out = self.out / f"train-{method}{self.tag}"
            set_aside_stale_run(out, folders[method], config.to_dict())
            state = Trainer(folders[method], str(self.corpus_dir), out, config).run()
            last = state["rounds"][str(a.rounds - 1)]
            if "router_accuracy" in last:
                print(f"router accuracy vs oracle: {100 * last['router_accuracy']['mean']:.1f}%")
            label = "readme trained" if method == "readme" else "prune trained"
            trained[method] = final_model_dir(out)
            self.evaluate(trained[method], label)
        return trained

    def write_table(self) -> None:
        from readmoe.eval.domains import format_ppl_table
        from readmoe.io import atomic_write_json, atomic_write_text

        step("held-out perplexity per domain")
        atomic_write_json(self.out / "ppl.json", self.reports)
        table = format_ppl_table(self.reports)
        atomic_write_text(self.out / "ppl.md", table + "\n")
        print(table)


    def analyze(self, model_dir: Path) -> None:
        from readmoe.analysis.collect import collect_choices
        from readmoe.analysis.report import write_analysis

        step("analysis: layer redundancy, temporal locality, domain x expert")
        choices = collect_choices(model_dir, self.corpus_dir, tokens=1024, block_size=256)
        out = self.out / "analysis"
        analysis = write_analysis(choices, out, {"model": str(model_dir), "layerwise_model": None,
                                                 "dense": None, "corpus": str(self.corpus_dir),
                                                 "router_type": "pregating"})
        oracle = analysis["layer_redundancy"]["oracle"]
        locality = analysis["temporal_locality"]
        print(f"neighbouring layers' oracle experts: mean normalised MI "
              f"{oracle['mean_normalised_mi']:.3f}, best-successor share "
              f"{100 * oracle['mean_best_successor_share']:.1f}%")
        print(f"temporal locality: pre-gating router reuses the previous token's expert for "
              f"{100 * locality['pregating']['reuse_share']:.1f}% of tokens (paper: 71.3%; "
              f"Mixtral 20.8%); oracle per layer "
              f"{100 * locality['oracle_per_layer']['reuse_share']:.1f}%")
        print(f"figures and tables in {out}/")

    def quality(self, trained: dict[str, Path]) -> None:
        from readmoe.eval.params import parameter_counts
        from readmoe.eval.tasks import evaluate_tasks, prepare_tasks
        from readmoe.io import atomic_write_text
        from readmoe.models import load_model

        tasks = ["arc_easy", "hellaswag"]
        step(f"quality table (lm-eval {', '.join(tasks)}, {self.args.task_limit} items each)")
        tasks_dir, _ = prepare_tasks()
        specs = {"dense": self.args.model, "readme trained": trained["readme"],
                 "prune trained": trained["prune"]}
        ppl = {r["label"]: r["domains"] for r in self.reports}
        lines = ["| model | active / total params | mean held-out ppl | "
                 + " | ".join(f"{t} acc" for t in tasks) + " |",
                 "|---|---:|---:|" + "---:|" * len(tasks)]
        for label, spec in specs.items():
            model = load_model(str(spec))
            counts = parameter_counts(model)
            out = evaluate_tasks(model, self.tokenizer, tasks, tasks_dir, model_name=str(spec),
                                 limit=self.args.task_limit)
            acc = {r["task"]: r["value"] for r in out["rows"] if r["metric"] == "acc"}
            mean_ppl = sum(v["ppl"] for v in ppl[label].values()) / len(ppl[label])
            lines.append(f"| {label} | {counts['active'] / 1e6:.1f}M / "
                         f"{counts['total'] / 1e6:.1f}M | {mean_ppl:.1f} | "
                         + " | ".join(f"{acc[t]:.2f}" for t in tasks) + " |")
        table = "\n".join(lines)
        atomic_write_text(self.out / "quality.md", table + "\n")
        print(table)


    def serve(self, model_dir: Path) -> None:
        from dataclasses import replace

        import torch

        from readmoe.cli.bench_cmds import corpus_prompts
        from readmoe.io import atomic_write_json
        from readmoe.models import load_model, load_tokenizer
        from readmoe.serve.engine import Engine
        from readmoe.serve.placement import place_for_offload, routed_expert_bytes
        from readmoe.serve.systems import (
            calibrate,
            capacity_for,
            make_settings,
            make_system,
            run_engine,
        )
        from readmoe.serve.types import Budget
        from readmoe.serve.workload import synthetic_workload

        requests = self.args.serve_requests
        step(f"serving: {requests} requests at 1.5/s, 3 of 6 experts per layer in fast memory "
             "behind an emulated link (one expert-layer load takes one layer's compute)")
        torch.set_num_threads(1)  # the other core is the copy engine's
        tokenizer, budget = load_tokenizer(str(model_dir)), Budget(128, 32)
        resident, offloaded = load_model(str(model_dir)), load_model(str(model_dir))
        routed = routed_expert_bytes(resident)
        place_for_offload(offloaded)
        specs = [replace(s, max_tokens=min(s.max_tokens, 32)) for s in synthetic_workload(
            requests, 1.5, corpus_prompts(tokenizer, str(self.corpus_dir), split="heldout"),
            seed=1)]
        setting = make_settings(calibrate(resident, tokenizer, model_dir, specs, budget),
                                ["link"])["link"]
        runs = {"resident (all experts)": Engine(resident, tokenizer, "fcfs", budget,
                                                 kv_blocks=2048).run_workload(specs)}
        runs["resident (all experts)"]["fast_tier_bytes"] = routed
        for name in ("readme-lru", "readme-codesign"):
            experts = resident.config.num_experts
            system = make_system(name, setting, capacity=capacity_for(0.5, experts),
                                 num_experts=experts)
            runs[name] = run_engine(system, offloaded, tokenizer,
                                    str(model_dir), specs=specs, share=0.5, setting=setting,
                                    routed_bytes=routed, budget=budget, kv_blocks=2048)
            runs[name].pop("steps_detail")
        lines = ["| system | routed expert memory (MB) | TTFT p50 (ms) | TPOT mean (ms) | "
                 "norm. latency mean (ms) | tokens/s | hit ratio | load hidden |",
                 "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for label, run in runs.items():
            hit = (run["cache"] or {}).get("hit_ratio")
            hidden = run["load_hidden_fraction"]
            lines.append(f"| {label} | {run['fast_tier_bytes'] / 1e6:.0f} | "
                         f"{1e3 * run['ttft_s']['p50']:.0f} | {1e3 * run['tpot_s']['mean']:.0f} | "
                         f"{1e3 * run['normalized_latency_s']['mean']:.0f} | "
                         f"{run['throughput_tokens_per_s']:.1f} | "
                         f"{'-' if hit is None else f'{100 * hit:.1f}%'} | "
                         f"{'-' if hidden is None else f'{100 * hidden:.0f}%'} |")
        atomic_write_json(self.out / "serve.json", {"setting": vars(setting), "runs": runs})
        print("\n".join(lines))
        print("readme-lru: FCFS, LRU, experts loaded when a layer needs them. readme-codesign: "
              "the router's foresight used (cache-aware batching, Belady over known and "
              "predicted uses, every load issued ahead, next-step experts prefetched). "
              "benchmarks/codesign.py has the whole comparison.")


    def serve_http(self, model_dir: Path, question: str = "What is a mixture of experts?"
                   ) -> None:
        from openai import OpenAI

        from readmoe.server.process import ServerProcess

        step("serving over HTTP: readmoe serve + the official openai client")
        with ServerProcess(model_dir, "--served-model-name", "readme-demo") as server:
            print(f"readmoe serve {model_dir} is listening on {server.url} (pid {server.pid})")
            with OpenAI(base_url=server.base_url, api_key="none", max_retries=0) as client:
                print(f"Q: {question}\nA: ", end="", flush=True)
                stream = client.chat.completions.create(
                    model="readme-demo", messages=[{"role": "user", "content": question}],
                    max_tokens=48, temperature=0, stream=True)
                for chunk in stream:
                    if chunk.choices:
                        print(chunk.choices[0].delta.content or "", end="", flush=True)
            status = server.stop()
        if status != 0:
            raise ReadmoeError(f"readmoe serve exited with status {status} after SIGTERM:\n"
                               f"{server.log()}")
        print(f"\nserver shut down cleanly on SIGTERM (exit status {status})")


def main(argv: list[str] | None = None) -> int:
    try:
        Demo(parse_args(argv)).run()
    except ReadmoeError as exc:
        print(f"readmoe: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
