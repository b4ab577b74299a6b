"""A tiny refactored ReadME model (3 domain experts) to train in tests."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from readmoe.cli import main

ALPHABETS = {"digits": "0123456789 ", "lower": "abcdefghij ", "upper": "ABCDEFGHIJ "}


@pytest.fixture
def train_corpus_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "corpus"
    folder.mkdir()
    rng = random.Random(0)
    for domain, alphabet in ALPHABETS.items():
        docs = ["".join(rng.choice(alphabet) for _ in range(400)) for _ in range(24)]
        (folder / f"{domain}.jsonl").write_text(
            "".join(json.dumps({"text": d}) + "\n" for d in docs))
    return folder


@pytest.fixture
def tiny_moe_dir(tmp_path: Path, tiny_llama_dir: Path, train_corpus_dir: Path) -> Path:
    stats = tmp_path / "stats"
    assert main(["stats", str(tiny_llama_dir), "--corpus", str(train_corpus_dir), "--out",
                 str(stats), "--tokens", "256", "--block-size", "32"]) == 0
    out = tmp_path / "moe"
    assert main(["refactor", str(tiny_llama_dir), "--corpus", str(train_corpus_dir), "--out",
                 str(out), "--stats", str(stats)]) == 0
    return out
