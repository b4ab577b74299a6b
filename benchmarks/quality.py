"""The quality table: dense, ReadME and the baselines at stated active / total parameters and
training tokens, on per-domain held-out perplexity and lm-eval tasks (offline data).

Perplexities come from results/refactor_quality.json and results/train_quality.json (run
those first); this script adds parameter counts and runs the tasks on the models that can
run them alone (dense, and the trained models, which route with their own router).

    .venv/bin/python benchmarks/quality.py [--limit 40] [--tasks arc_easy,...]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from readmoe.errors import ReadmoeError
from readmoe.eval.params import parameter_counts
from readmoe.eval.tasks import evaluate_tasks, prepare_tasks
from readmoe.io import write_results
from readmoe.models import load_model, load_tokenizer

DEFAULT_TASKS = "arc_easy,arc_challenge,hellaswag,winogrande,piqa,sciq,boolq"
TASK_MODELS = ("dense", "readme trained (router)", "prune trained")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default="results")
    parser.add_argument("--tasks", default=DEFAULT_TASKS)
    parser.add_argument("--limit", type=int, default=40, help="items per task")
    return parser.parse_args()


def load_reports(results: Path) -> tuple[dict, dict]:
    paths = [results / "refactor_quality.json", results / "train_quality.json"]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ReadmoeError(f"missing {', '.join(missing)}: run benchmarks/refactor_quality.py "
                           "and benchmarks/train_quality.py first")
    return tuple(json.loads(p.read_text()) for p in paths)


def main() -> int:
    args = parse_args()
    results = Path(args.results)
    refactor, train = load_reports(results)
    tasks = args.tasks.split(",")
    tasks_dir, _ = prepare_tasks()
    started = time.time()
    rows = []
    labels = {r["label"]: r for r in refactor["reports"]}
    labels.update({r["label"]: r for r in train["reports"]})
    for label, report in labels.items():
        spec = report["model"]
        model = load_model(spec)
        counts = parameter_counts(model)
        trained = label.startswith(("readme trained", "prune trained"))
        row = {"label": label, "model": spec, "routing": report.get("routing"),
               "parameters": counts,
               "training_tokens": train["expert_tuning_tokens"] if trained else 0,
               "ppl": {d: v["ppl"] for d, v in report["domains"].items()}}
        if label in TASK_MODELS:
            print(f"tasks: {label}", flush=True)
            out = evaluate_tasks(model, load_tokenizer(spec), tasks, tasks_dir,
                                 model_name=spec, limit=args.limit)
            row["tasks"] = {r["task"]: r["value"] for r in out["rows"] if r["metric"] == "acc"}
        rows.append(row)
        del model
    summary = {"command": "python benchmarks/quality.py " + " ".join(sys.argv[1:]),
               "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads, fp32",
               "seconds": round(time.time() - started), "limit": args.limit, "tasks": tasks,
               "rows": rows}
    write_results(results, "quality", summary, render(summary))
    return 0


def render(summary: dict) -> str:
    rows, tasks = summary["rows"], summary["tasks"]
    domains = sorted(rows[0]["ppl"])
    head = (["model", "active / total params", "tuning tokens"] + domains
            + [f"{t} acc" for t in tasks])
    lines = ["# Quality: dense vs ReadME vs baselines (smollm2-135m)", "",
             f"Command: `{summary['command']}`  ",
             f"Machine: {summary['machine']}; tasks with --limit {summary['limit']} items each "
             "(lm-eval 0.4, stock prompts, offline data; small n: read the stderr in "
             "the JSON). Perplexity: held-out, 512-token windows.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        p = row["parameters"]
        cells = [row["label"], f"{p['active'] / 1e6:.1f}M / {p['total'] / 1e6:.1f}M",
                 f"{row['training_tokens']:,}"]
        cells += [f"{row['ppl'][d]:.1f}" for d in domains]
        cells += [f"{row['tasks'][t]:.3f}" if t in row.get("tasks", {}) else "-" for t in tasks]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
