"""A tiny three-domain corpus whose domains use visibly different characters."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

ALPHABETS = {"digits": "0123456789 ", "lower": "abcdefghij ", "upper": "ABCDEFGHIJ "}


@pytest.fixture
def tiny_corpus_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "corpus"
    folder.mkdir()
    rng = random.Random(0)
    for domain, alphabet in ALPHABETS.items():
        lines = []
        for _ in range(20):
            text = "".join(rng.choice(alphabet) for _ in range(300))
            lines.append(json.dumps({"text": text}))
        (folder / f"{domain}.jsonl").write_text("\n".join(lines) + "\n")
    return folder
