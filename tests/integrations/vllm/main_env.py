"""The vLLM suite's way into the main environment (``reference.py`` in a subprocess), and
where the trained default model is. Imports nothing of vLLM or readmoe.model."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
REFERENCE = Path(__file__).with_name("reference.py")
SKIP_REASON = "the vLLM suite runs in .venv-vllm: make vllm && make test-vllm"
DEMO_RUN = ROOT / "runs" / "demo" / "train-readme"


def main_python() -> str:
    """The main environment's python: $READMOE_MAIN_PYTHON, else .venv/bin/python."""
    python = os.environ.get("READMOE_MAIN_PYTHON") or str(ROOT / ".venv" / "bin" / "python")
    if not Path(python).exists():
        pytest.fail(f"{python} not found: the parity references run in the main environment; "
                    "`make test-vllm` makes .venv, or set READMOE_MAIN_PYTHON")
    return python


def run_reference(*args: str, stdin: str | None = None) -> str:
    result = subprocess.run([main_python(), str(REFERENCE), *args], input=stdin, text=True,
                            capture_output=True, timeout=1200, cwd=ROOT)
    if result.returncode:
        pytest.fail(f"reference.py {args[0]} failed:\n{result.stderr[-4000:]}")
    return result.stdout


def reference_answers(folder: Path, prompts: list[list[int]], max_tokens: int,
                      margin: float | None = None) -> dict:
    """HF generate's and readmoe's engine's greedy outputs, and the router's experts
    (``margin``: the routing hysteresis to answer with; None: the folder's)."""
    extra = [] if margin is None else [str(margin)]
    return json.loads(run_reference("answer", str(folder), str(max_tokens), *extra,
                                    stdin=json.dumps(prompts)))


def default_model_folder() -> Path | None:
    """$READMOE_VLLM_MODEL, else the last round `make demo` trained, else None."""
    if os.environ.get("READMOE_VLLM_MODEL"):
        return Path(os.environ["READMOE_VLLM_MODEL"])
    rounds = sorted(DEMO_RUN.glob("round-*"), key=lambda path: int(path.name.split("-")[1]))
    return rounds[-1] if rounds else None
