"""A tiny three-domain corpus whose domains use visibly different characters."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import write_alphabet_corpus


@pytest.fixture
def tiny_corpus_dir(tmp_path: Path) -> Path:
    return write_alphabet_corpus(tmp_path / "corpus", docs=20, length=300)
