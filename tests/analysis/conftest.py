"""Routed copies of the tiny refactored model (tests/train/conftest.py) to analyse."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.train.conftest import tiny_moe_dir, train_corpus_dir  # noqa: F401  (fixtures)


def routed_copy(moe_dir: Path, out: Path, router_type: str) -> Path:
    """``moe_dir`` with a freshly attached (untrained) router, saved with its plan."""
    from readmoe.models import load_model, load_tokenizer
    from readmoe.refactor.plan import ExpertPlan
    from readmoe.refactor.slicing import save_readme

    model = load_model(str(moe_dir))
    model.attach_router(router_type, seed=1)
    return save_readme(model, out, tokenizer=load_tokenizer(str(moe_dir)),
                       plan=ExpertPlan.load(moe_dir / "plan"))


@pytest.fixture
def pregating_dir(tmp_path: Path, tiny_moe_dir: Path) -> Path:  # noqa: F811
    return routed_copy(tiny_moe_dir, tmp_path / "pregating", "pregating")


@pytest.fixture
def layerwise_dir(tmp_path: Path, tiny_moe_dir: Path) -> Path:  # noqa: F811
    return routed_copy(tiny_moe_dir, tmp_path / "layerwise", "layerwise")
