"""vLLM on tiny random ReadME folders (pre-gating, layer-wise, one expert) against HF generate
and readmoe's engine, all in fp32: equal greedy tokens one by one and in mixed batches; the
pre-gating router reads every token exactly once, in order, and chooses what a full recompute
chooses; prefix caching skips router and backbone alike."""

from __future__ import annotations

import random

import pytest

from tests.integrations.vllm.main_env import SKIP_REASON, reference_answers

pytest.importorskip("vllm", reason=SKIP_REASON)

from tests.integrations.vllm.harness import (  # noqa: E402
    RouterCalls,
    greedy,
    make_llm,
    one_by_one,
)

KINDS = ("pregating", "layerwise", "one-expert")
LENGTHS = (5, 17, 9, 40, 1, 26)  # 40 > one 32-token step: a prefill in two chunks
MAX_TOKENS = 12
BLOCK = 32  # KV block size: a 40-token prompt fills one block, which prefix caching can reuse


def tiny_prompts(vocab: int = 100) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in LENGTHS]


PROMPTS = tiny_prompts()


@pytest.fixture(scope="module")
def served(tiny_folders):
    """kind -> (LLM, reference answers), each built on first use."""
    cache = {}

    def get(kind: str):
        if kind not in cache:
            folder = tiny_folders / kind
            cache[kind] = (make_llm(folder, block_size=BLOCK),
                           reference_answers(folder, PROMPTS, MAX_TOKENS))
        return cache[kind]
    return get


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_tokens_equal_hf_generate_and_the_engine(served, kind):
    llm, reference = served(kind)
    assert reference["engine"] == reference["hf"]
    assert one_by_one(llm, PROMPTS, MAX_TOKENS) == reference["hf"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_mixed_batch_equals_one_by_one(served, kind):
    llm, reference = served(kind)
    # six prompts, at most four sequences and 32 tokens per step: prefill chunks and decode
    # tokens of several requests share steps, requests join as others finish
    assert greedy(llm, PROMPTS, MAX_TOKENS) == one_by_one(llm, PROMPTS, MAX_TOKENS)
    assert greedy(llm, PROMPTS[::-1], MAX_TOKENS) == reference["hf"][::-1]


def test_router_reads_each_token_once_and_chooses_as_a_full_recompute(served):
    llm, reference = served("pregating")
    llm.reset_prefix_cache()
    for prompt, expected, experts in zip(PROMPTS, reference["hf"], reference["experts"],
                                         strict=True):
        with RouterCalls(llm) as calls:
            output = greedy(llm, [prompt], MAX_TOKENS)[0]
        assert output == expected
        # the prompt in chunks of at most 32 tokens, then one call per fed-back token
        assert calls.tokens == prompt + output[:-1]
        decodes = len(output) - 1
        assert [len(ids) for ids, _ in calls.calls] == [
            *(min(32, len(prompt) - start) for start in range(0, len(prompt), 32)),
            *[1] * decodes]
        assert calls.experts == experts


def test_batched_steps_route_only_their_new_tokens(served):
    llm, reference = served("pregating")
    llm.reset_prefix_cache()
    with RouterCalls(llm) as calls:
        outputs = greedy(llm, PROMPTS, MAX_TOKENS)
    assert outputs == reference["hf"]
    fed = sum(len(p) + len(out) - 1 for p, out in zip(PROMPTS, outputs, strict=True))
    assert len(calls.tokens) == fed
    assert max(len(ids) for ids, _ in calls.calls) <= 32


def test_a_cached_prefix_is_neither_rerouted_nor_recomputed(served):
    llm, reference = served("pregating")
    prompt, expected = PROMPTS[3], reference["hf"][3]  # 40 tokens: one full block
    llm.reset_prefix_cache()
    assert greedy(llm, [prompt], MAX_TOKENS)[0] == expected
    with RouterCalls(llm) as calls:
        assert greedy(llm, [prompt], MAX_TOKENS)[0] == expected
    assert calls.tokens == (prompt + expected[:-1])[BLOCK:]
    assert calls.experts == reference["experts"][3][BLOCK:]
