"""A tiny refactored ReadME model (3 domain experts) to train in tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import refactor_tiny, write_alphabet_corpus


@pytest.fixture
def train_corpus_dir(tmp_path: Path) -> Path:
    return write_alphabet_corpus(tmp_path / "corpus", docs=24, length=400)


@pytest.fixture
def tiny_moe_dir(tmp_path: Path, tiny_llama_dir: Path, train_corpus_dir: Path) -> Path:
    return refactor_tiny(tmp_path, tiny_llama_dir, train_corpus_dir)
