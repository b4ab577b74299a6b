"""`readmoe bench serve` through the CLI on a tiny ReadME folder: resident and offloaded runs
report the same tokens, the offloaded one its cache counters; bad flag combinations fail."""

from __future__ import annotations

import json

import pytest

from readmoe.cli import main
from readmoe.models import load_model
from tests.conftest import char_tokenizer, refactor_tiny, write_alphabet_corpus


@pytest.fixture
def served(tmp_path, tiny_llama_dir):
    corpus = write_alphabet_corpus(tmp_path / "corpus", docs=12, length=400)
    model = load_model(str(refactor_tiny(tmp_path, tiny_llama_dir, corpus)))
    model.attach_router("pregating", seed=0)
    folder = tmp_path / "served"
    model.save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder, corpus


def _bench(folder, corpus, out, *flags) -> dict:
    assert main(["bench", "serve", str(folder), "--corpus", str(corpus), "--requests", "4",
                 "--max-output", "6", "--seed", "1", "--json", str(out), *flags]) == 0
    return json.loads(out.read_text())


def test_offloaded_serving_reports_cache_counters(served, tmp_path):
    folder, corpus = served
    resident = _bench(folder, corpus, tmp_path / "resident.json")
    assert resident["cache"] is None and resident["experts"]["store"].startswith("all")
    offloaded = _bench(folder, corpus, tmp_path / "offloaded.json", "--capacity", "1",
                       "--cache-policy", "lru", "--no-prefetch", "--tier", "ram",
                       "--bandwidth", "1e9")
    assert offloaded["output_tokens"] == resident["output_tokens"]
    assert offloaded["cache"]["misses"] > 0 and "emulated" in offloaded["experts"]["store"]
    assert offloaded["experts"]["expert_bytes_released"] == resident["experts"][
        "routed_expert_bytes"] > offloaded["experts"]["fast_tier_bytes"] > 0
    assert offloaded["load_hidden_fraction"] == pytest.approx(0.0, abs=0.05)
    capped = _bench(folder, corpus, tmp_path / "capped.json", "--scheduler", "expert-aware",
                    "--max-experts", "1", "--capacity", "1")
    assert capped["scheduler_options"] == {"max_experts": 1}
    assert capped["output_tokens"] == resident["output_tokens"]


def test_offloading_flags_without_capacity_are_refused(served, tmp_path, capsys):
    folder, corpus = served
    assert main(["bench", "serve", str(folder), "--corpus", str(corpus),
                 "--bandwidth", "1e9"]) == 2
    assert "--capacity" in capsys.readouterr().err


def test_a_jsonl_trace_is_replayed(served, tmp_path):
    folder, _ = served
    trace = tmp_path / "trace.jsonl"
    records = [{"arrival_time": 0.0, "prompt": "abcabcab", "max_tokens": 3, "id": "x"},
               {"arrival_time": 0.05, "prompt": [5, 6, 7], "max_tokens": 4},
               {"arrival_time": 0.1, "prompt": "defdef", "max_tokens": 2}]
    trace.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "trace.json"
    assert main(["bench", "serve", str(folder), "--trace", str(trace), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["requests"] == 3 and result["output_tokens"] == 9
    assert result["workload"] == {"trace": str(trace)}


def test_a_workload_source_is_required(served, capsys):
    folder, _ = served
    assert main(["bench", "serve", str(folder)]) == 2
    assert "--corpus" in capsys.readouterr().err
