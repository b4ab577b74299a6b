"""Statistics folders are reused only for the inputs they were computed from (issue 13,
item 6): another corpus, token count, block size or model is refused before any model
loads, and --recompute-stats computes them afresh."""

from __future__ import annotations

import json
import re
import shutil

import pytest

import readmoe.refactor.pipeline as pipeline
from readmoe.cli import main
from readmoe.errors import ReadmoeError
from readmoe.refactor.stats import ActivationStats
from tests.conftest import write_alphabet_corpus

STATS_ARGS = ["--tokens", "256", "--block-size", "32"]


@pytest.fixture
def stats_dir(tmp_path, tiny_llama_dir, tiny_corpus_dir):
    folder = tmp_path / "stats"
    assert main(["stats", str(tiny_llama_dir), "--corpus", str(tiny_corpus_dir), "--out",
                 str(folder), *STATS_ARGS]) == 0
    return folder


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fail the test if statistics are computed: a reuse or a refusal loads no model."""
    def refuse(*args, **kwargs):
        raise AssertionError("statistics were recomputed")

    monkeypatch.setattr(pipeline, "compute_stats", refuse)


def refactor(model_dir, corpus_dir, stats, out, *extra) -> int:
    return main(["refactor", str(model_dir), "--corpus", str(corpus_dir), "--out", str(out),
                 "--stats", str(stats), *extra])


def test_matching_stats_are_reused(tmp_path, tiny_llama_dir, tiny_corpus_dir, stats_dir,
                                   no_model_loads):
    assert refactor(tiny_llama_dir, tiny_corpus_dir, stats_dir, tmp_path / "a") == 0
    assert refactor(tiny_llama_dir, tiny_corpus_dir, stats_dir, tmp_path / "b",
                    *STATS_ARGS) == 0
    assert main(["stats", str(tiny_llama_dir), "--corpus", str(tiny_corpus_dir), "--out",
                 str(stats_dir), *STATS_ARGS]) == 0


@pytest.mark.parametrize(("extra", "message"), [
    (["--tokens", "128"], r"token count \(--tokens\) 256, not 128"),
    (["--block-size", "16"], r"block size \(--block-size\) 32, not 16"),
])
def test_other_token_count_or_block_size_is_refused(tmp_path, tiny_llama_dir, tiny_corpus_dir,
                                                    stats_dir, no_model_loads, capsys, extra,
                                                    message):
    assert refactor(tiny_llama_dir, tiny_corpus_dir, stats_dir, tmp_path / "moe", *extra) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert "--recompute-stats" in err
    assert not (tmp_path / "moe").exists()


def test_stats_resumed_with_another_token_count_are_refused(tiny_llama_dir, tiny_corpus_dir,
                                                            stats_dir, no_model_loads, capsys):
    assert main(["stats", str(tiny_llama_dir), "--corpus", str(tiny_corpus_dir), "--out",
                 str(stats_dir), "--tokens", "512", "--block-size", "32"]) == 2
    assert "token count (--tokens) 256, not 512" in capsys.readouterr().err


def test_another_corpus_is_refused(tmp_path, tiny_llama_dir, stats_dir, no_model_loads, capsys):
    other = write_alphabet_corpus(tmp_path / "other", docs=21, length=300)
    assert refactor(tiny_llama_dir, other, stats_dir, tmp_path / "moe") == 2
    assert "whose documents differ" in capsys.readouterr().err


def test_recompute_stats_replaces_mismatched_stats(tmp_path, tiny_llama_dir, tiny_corpus_dir,
                                                   stats_dir):
    assert refactor(tiny_llama_dir, tiny_corpus_dir, stats_dir, tmp_path / "moe",
                    "--tokens", "128", "--block-size", "32", "--recompute-stats") == 0
    stats = ActivationStats.load(stats_dir)
    assert stats.tokens_requested == 128 and stats.tokens["digits"] == 128
    assert json.loads((tmp_path / "moe" / "config.json").read_text())["model_type"] == "readme"


def test_absent_stats_folder_is_computed_there(tmp_path, tiny_llama_dir, tiny_corpus_dir,
                                               stats_dir):
    fresh = tmp_path / "fresh"
    shutil.copytree(stats_dir, fresh)
    for path in fresh.iterdir():
        path.unlink()
    assert refactor(tiny_llama_dir, tiny_corpus_dir, fresh, tmp_path / "moe", *STATS_ARGS) == 0
    assert ActivationStats.load(fresh).tokens == ActivationStats.load(stats_dir).tokens


def test_run_stats_refuses_before_loading_the_model(tiny_llama_dir, tiny_corpus_dir,
                                                    stats_dir, monkeypatch):
    import readmoe.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(ReadmoeError, match="block size"):
        pipeline.run_stats(str(tiny_llama_dir), str(tiny_corpus_dir), stats_dir, tokens=256,
                           block_size=64)
