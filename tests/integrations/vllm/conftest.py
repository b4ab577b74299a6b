"""Fixtures of the vLLM suite. Its vLLM tests run in .venv-vllm (`make test-vllm`) and skip
where vLLM is not installed; the references they compare with come from the main environment
(``main_env``)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from tests.integrations.vllm.main_env import run_reference

if importlib.util.find_spec("vllm") is not None:
    # the engine core in this process, so a hook on the model sees every step; never a hub
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_folders(tmp_path_factory) -> Path:
    """Tiny random ReadME folders made by the main environment: ``<root>/<kind>``."""
    root = tmp_path_factory.mktemp("tiny")
    run_reference("tiny", str(root))
    return root
