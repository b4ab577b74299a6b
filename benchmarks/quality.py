"""lm-eval tasks with enough items to tell models apart: dense, trained ReadME, trained prune.

Every model answers the same items (the first ``--limit`` of each task's evaluated split), so
each pair is compared item by item: a paired z-test on the 0/1 scores (readmoe.eval.
significance) says which differences are beyond chance at 5%. The per-task metric is the one
papers quote: ``acc_norm`` where lm-eval has it (ARC, HellaSwag, PIQA), else ``acc``
(WinoGrande); the average is over tasks, unweighted.

Resumable: each (model, task) result lands in ``--work`` as it finishes and is reused when the
model's weights, the task and the item count are unchanged.

    .venv/bin/python benchmarks/quality.py            # the demo's folders, 500 items per task
    .venv/bin/python benchmarks/quality.py --model "readme trained=runs/x/train-readme/round-3"
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import platform
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from readmoe.errors import ReadmoeError
from readmoe.eval.params import parameter_counts
from readmoe.eval.routing_modes import oracle_forward
from readmoe.eval.significance import Difference, average_difference, mean_stderr, paired_difference
from readmoe.eval.tasks import check_task_names, evaluate_tasks, prepare_tasks
from readmoe.io import atomic_write_json, command_line, write_results
from readmoe.models import load_model, load_tokenizer

DEFAULT_TASKS = "arc_easy,arc_challenge,hellaswag,piqa,winogrande"
DEFAULT_MODELS = ("dense=smollm2-135m", "readme trained=runs/demo/train-readme/round-1",
                  "prune trained=runs/demo/train-prune/round-1")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", metavar="LABEL=SPEC",
                        help=f"a model to score (repeat; default: {', '.join(DEFAULT_MODELS)})")
    parser.add_argument("--tasks", default=DEFAULT_TASKS)
    parser.add_argument("--limit", type=int, default=500, help="items per task")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--work", default="runs/quality", help="per-(model, task) results")
    parser.add_argument("--oracle", action="append", default=[], metavar="LABEL",
                        help="score the ReadME model of this --model label with oracle routing "
                        "(each token's best expert from the dense model's activations): what "
                        "its experts can do if its router chose as the oracle does")
    parser.add_argument("--results", default="results")
    parser.add_argument("--name", default="quality", help="results/<NAME>.{json,md}")
    return parser.parse_args()


def parse_models(values: list[str]) -> dict[str, str]:
    models = {}
    for value in values:
        label, sep, spec = value.partition("=")
        if not sep or not label or not spec:
            raise ReadmoeError(f"--model {value!r}: write LABEL=SPEC, e.g. "
                               "'prune trained=runs/demo/train-prune/round-1'")
        if label in models:
            raise ReadmoeError(f"--model label {label!r} is given twice")
        models[label] = spec
    return models


def weights_stamp(spec: str) -> str:
    """What identifies a model's weights: a folder's weight files by name, size and mtime (a
    retrained folder gets new scores), else the built-in name or file itself."""
    folder = Path(spec)
    if not folder.is_dir():
        return spec
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ReadmoeError(f"{spec} holds no *.safetensors weights: train or convert it first")
    stamp = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return hashlib.sha256(json.dumps(stamp).encode()).hexdigest()[:16]


def primary_metric(items: dict) -> str:
    return "acc_norm" if "acc_norm" in items else "acc"


def score_all(models: dict[str, str], tasks: list[str], args: argparse.Namespace) -> dict:
    """label -> task -> {"metric", "value", "stderr", "doc_id", "scores"}, from the work folder
    where it is current, else measured now."""
    tasks_dir, available = prepare_tasks()
    check_task_names(tasks, available)
    work = Path(args.work)
    out: dict[str, dict] = {label: {} for label in models}
    todo = []
    unknown = sorted(set(args.oracle) - set(models))
    if unknown:
        raise ReadmoeError(f"--oracle {', '.join(unknown)}: no --model has that label")
    for label, spec in models.items():
        stamp = weights_stamp(spec)
        for task in tasks:
            path = work / f"{hashlib.sha256(label.encode()).hexdigest()[:8]}-{task}.json"
            key = {"label": label, "model": spec, "weights": stamp, "task": task,
                   "limit": args.limit}
            if label in args.oracle:
                key["routing"] = "oracle"
            cached = json.loads(path.read_text()) if path.is_file() else None
            if cached is not None and cached["key"] == key:
                out[label][task] = cached["score"]
            else:
                todo.append((label, spec, task, path, key))
    loaded: tuple[str, object, object] | None = None
    for label, spec, task, path, key in tqdm(todo, desc="model x task", unit="run"):
        if loaded is None or loaded[0] != spec:
            loaded = (spec, load_model(spec), load_tokenizer(spec))
        routing = (oracle_forward(loaded[1], spec) if label in args.oracle
                   else contextlib.nullcontext())
        with routing:
            report = evaluate_tasks(loaded[1], loaded[2], [task], tasks_dir, model_name=spec,
                                    limit=args.limit, batch_size=args.batch_size,
                                    per_item=True)
        items = report["items"][task]
        metric = primary_metric(items)
        scores = items[metric]
        score = {"metric": metric, "value": sum(scores) / len(scores),
                 "stderr": mean_stderr(scores), "doc_id": items["doc_id"], "scores": scores,
                 "seconds": report["seconds"]}
        atomic_write_json(path, {"key": key, "score": score})
        out[label][task] = score
    return out


def compare(scores: dict[str, dict], tasks: list[str]) -> list[dict]:
    """Every pair of models (first minus second), per task and on the average."""
    rows = []
    for a, b in itertools.combinations(scores, 2):
        per_task: dict[str, Difference] = {}
        for task in tasks:
            sa, sb = scores[a][task], scores[b][task]
            if sa["doc_id"] != sb["doc_id"]:
                raise ReadmoeError(f"{a} and {b} were scored on different {task} items: delete "
                                   "the work folder's files of this task and rerun")
            per_task[task] = paired_difference(sa["scores"], sb["scores"])
        rows.append({"a": a, "b": b,
                     "tasks": {t: d.as_dict() for t, d in per_task.items()},
                     "average": average_difference(list(per_task.values())).as_dict()})
    return rows


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    models = parse_models(args.model or list(DEFAULT_MODELS))
    tasks = args.tasks.split(",")
    started = time.time()
    scores = score_all(models, tasks, args)
    rows = []
    for label, spec in models.items():
        per_task = {t: {k: scores[label][t][k] for k in ("metric", "value", "stderr")}
                    for t in tasks}
        values = [s["value"] for s in per_task.values()]
        rows.append({"label": label, "model": spec,
                     "routing": "oracle" if label in args.oracle else "own",
                     "parameters": parameter_counts(load_model(spec)), "tasks": per_task,
                     "average": sum(values) / len(values),
                     "n": {t: len(scores[label][t]["scores"]) for t in tasks}})
    summary = {"command": command_line(),
               "machine": f"{platform.machine()} CPU, {args.threads} threads, fp32",
               "seconds": round(time.time() - started), "limit": args.limit, "tasks": tasks,
               "rows": rows, "comparisons": compare(scores, tasks)}
    write_results(args.results, args.name, summary, render(summary))
    return 0


def _pm(value: float, stderr: float) -> str:
    return f"{value:.3f} ± {stderr:.3f}"


def render(summary: dict) -> str:
    rows, tasks = summary["rows"], summary["tasks"]
    metrics = {t: rows[0]["tasks"][t]["metric"] for t in tasks}
    head = ["model", "active / total params"] + [f"{t} {metrics[t]}" for t in tasks] + ["average"]
    lines = ["# lm-eval tasks: dense vs trained ReadME vs trained prune", "",
             f"Command: `{summary['command']}`  ",
             f"Machine: {summary['machine']}; {summary['seconds']} s. lm-eval 0.4 stock prompts "
             f"on offline data, zero-shot, the first {summary['limit']} items of each task "
             "(n per task in the JSON); value ± standard error.", "",
             "| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(tasks) + 1)]
    for row in rows:
        p = row["parameters"]
        cells = [row["label"], f"{p['active'] / 1e6:.1f}M / {p['total'] / 1e6:.1f}M"]
        cells += [_pm(row["tasks"][t]["value"], row["tasks"][t]["stderr"]) for t in tasks]
        cells.append(f"{row['average']:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Paired differences (first minus second; * = significant at 5%, paired "
              "z-test on the same items)", "",
              "| pair | " + " | ".join(tasks) + " | average |",
              "|---|" + "---:|" * (len(tasks) + 1)]
    for comp in summary["comparisons"]:
        cells = [f"{comp['a']} - {comp['b']}"]
        for d in [*(comp["tasks"][t] for t in tasks), comp["average"]]:
            mark = "*" if d["significant"] else ""
            cells.append(f"{d['mean']:+.3f} ± {d['stderr']:.3f} (p {d['p']:.2f}){mark}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
