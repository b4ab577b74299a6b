"""Tensor parallelism over two CPU ranks: heads split, every FFN split by channel with its odd
sizes zero-padded, the router replicated; greedy tokens equal HF generate's."""

from __future__ import annotations

import pytest

from tests.integrations.vllm.main_env import SKIP_REASON, reference_answers

pytest.importorskip("vllm", reason=SKIP_REASON)

from tests.integrations.vllm.harness import greedy, make_llm  # noqa: E402
from tests.integrations.vllm.test_tiny import MAX_TOKENS, PROMPTS  # noqa: E402


@pytest.mark.parametrize("kind", ["pregating", "layerwise"])
def test_two_ranks_give_the_same_tokens(tiny_folders, kind, monkeypatch):
    # one core per rank, and the ranks as processes (a worker per rank)
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    folder = tiny_folders / kind
    llm = make_llm(folder, tensor_parallel_size=2, distributed_executor_backend="mp")
    try:
        assert greedy(llm, PROMPTS, MAX_TOKENS) == reference_answers(
            folder, PROMPTS, MAX_TOKENS)["hf"]
    finally:
        llm.llm_engine.engine_core.shutdown()
