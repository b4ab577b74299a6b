"""vLLM on the trained default model (the last round `make demo` trained, or
$READMOE_VLLM_MODEL), fp32 on the CPU: greedy tokens equal HF generate's and readmoe's engine's,
alone and in a mixed batch; the router reads each token once; `readmoe serve --backend vllm`
answers the official openai client with the same text. The trained model ships with a routing
hysteresis that vLLM's per-token routing cannot keep: vLLM runs it with
``hf_overrides={"router_hysteresis": 0}`` (the fix its refusal names) and the references route
with margin 0 too."""

from __future__ import annotations

import json

import openai
import pytest

from tests.integrations.vllm.main_env import SKIP_REASON, default_model_folder, reference_answers

pytest.importorskip("vllm", reason=SKIP_REASON)

from transformers import AutoTokenizer  # noqa: E402

from tests.integrations.vllm.harness import (  # noqa: E402
    KV_CACHE_BYTES,
    RouterCalls,
    VllmServer,
    greedy,
    make_llm,
    one_by_one,
)

FOLDER = default_model_folder()
pytestmark = pytest.mark.skipif(FOLDER is None, reason="no trained default model: run `make "
                                "demo` first, or set READMOE_VLLM_MODEL to a trained folder")
TEXTS = ["The court held that", "def fibonacci(n):\n    ", "The patient was given",
         "In 1905, Einstein published"]
CHAT = [{"role": "user", "content": "What is a mixture of experts?"}]
MAX_TOKENS = 24
PER_TOKEN = {"router_hysteresis": 0.0}


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(FOLDER)


@pytest.fixture(scope="module")
def prompts(tokenizer):
    chat = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True,
                                         return_dict=False)
    return [tokenizer.encode(text) for text in TEXTS] + [list(chat)]


@pytest.fixture(scope="module")
def reference(prompts):
    return reference_answers(FOLDER, prompts, MAX_TOKENS, margin=0.0)


@pytest.fixture(scope="module")
def llm():
    return make_llm(FOLDER, max_model_len=256, hf_overrides=PER_TOKEN)


def test_greedy_tokens_equal_hf_generate_and_the_engine(llm, prompts, reference):
    assert reference["engine"] == reference["hf"]
    assert one_by_one(llm, prompts, MAX_TOKENS) == reference["hf"]
    assert greedy(llm, prompts, MAX_TOKENS) == reference["hf"]


def test_router_reads_each_token_once(llm, prompts, reference):
    llm.reset_prefix_cache()
    for prompt, expected, experts in zip(prompts, reference["hf"], reference["experts"],
                                         strict=True):
        with RouterCalls(llm) as calls:
            assert greedy(llm, [prompt], MAX_TOKENS)[0] == expected
        assert calls.tokens == prompt + expected[:-1]
        assert calls.experts == experts


def test_openai_client_gets_the_same_text(prompts, reference, tokenizer):
    flags = ["--served-model-name", "readme", "--dtype", "float32", "--enforce-eager",
             "--max-model-len", "256", "--kv-cache-memory-bytes", str(KV_CACHE_BYTES),
             "--hf-overrides", json.dumps(PER_TOKEN)]
    # the real `vllm serve` layout: API server and engine core in separate processes
    with (VllmServer(FOLDER, *flags, env={"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}) as server,
          openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0) as client):
        assert [m.id for m in client.models.list().data] == ["readme"]
        for text, expected in zip(TEXTS, reference["hf"], strict=False):
            reply = client.completions.create(model="readme", prompt=text, temperature=0,
                                              max_tokens=MAX_TOKENS)
            assert reply.choices[0].text == tokenizer.decode(expected, skip_special_tokens=True)
            assert reply.usage.completion_tokens == len(expected)
        chat = client.chat.completions.create(model="readme", messages=CHAT, temperature=0,
                                              max_tokens=MAX_TOKENS)
        assert chat.choices[0].message.content == tokenizer.decode(
            reference["hf"][-1], skip_special_tokens=True)
