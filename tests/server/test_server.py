"""A real `readmoe serve` on 127.0.0.1, called with the official openai client (sync and
async): greedy text equals the in-process engine's and HF generate's, streams add up to the
plain reply, every error has its status and an OpenAI error body, and a stream the client
cuts frees its KV blocks at once."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest
import torch

from readmoe.models import load_model, load_tokenizer
from readmoe.serve.engine import Engine
from readmoe.serve.sampling import SamplingParams

PROMPTS = ["hello world", "The court held that", "abc 123"]
MAX_TOKENS = 12
LONG = {"ignore_eos": True}  # extra_body: a request that runs for its whole max_tokens


@pytest.fixture(scope="module")
def reference(model_dir):
    """(model, tokenizer) loaded in this process from the folder the server serves."""
    return load_model(str(model_dir)), load_tokenizer(str(model_dir))


def engine_texts(reference, prompts: list, max_tokens: int = MAX_TOKENS) -> list[str]:
    model, tokenizer = reference
    outs = Engine(model, tokenizer).generate(prompts, SamplingParams(max_tokens=max_tokens))
    return [out.text for out in outs]


def metric(server, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    assert httpx.get(f"{server.url}/health", timeout=10).json()["status"] == "ok"


def test_greedy_completions_equal_engine_and_hf(server, client, reference):
    model, tokenizer = reference
    texts = [client.completions.create(model="tiny", prompt=p, max_tokens=MAX_TOKENS,
                                       temperature=0).choices[0].text for p in PROMPTS]
    assert texts == engine_texts(reference, PROMPTS)
    for prompt, text in zip(PROMPTS, texts, strict=True):
        ids = tokenizer.encode(prompt)
        hf = model.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False)
        assert text == tokenizer.decode(hf[0, len(ids):], skip_special_tokens=True)


def test_streamed_completion_adds_up_with_usage(client, reference):
    ids = [5, 17, 33, 42, 8]  # a prompt as token ids
    chunks = list(client.completions.create(model="tiny", prompt=ids, max_tokens=MAX_TOKENS,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == len(ids)
    tokens = chunks[-1].usage.completion_tokens
    assert len(chunks) == tokens + 1  # one event per token, then the usage
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    assert "".join(c.choices[0].text for c in chunks[:-1]) == engine_texts(reference, [ids])[0]


def test_chat_sync_and_async_streaming(server, client, reference):
    model, tokenizer = reference
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    reply = client.chat.completions.create(model="tiny", messages=messages,
                                           max_tokens=MAX_TOKENS, temperature=0)
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected = engine_texts(reference, [tokenizer.encode(prompt, add_special_tokens=False)])[0]
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == expected
    assert reply.usage.completion_tokens <= MAX_TOKENS

    async def streamed() -> list:
        async with openai.AsyncOpenAI(base_url=server.base_url, api_key="unused",
                                      max_retries=0) as aclient:
            stream = await aclient.chat.completions.create(
                model="tiny", messages=messages, max_tokens=MAX_TOKENS, temperature=0,
                stream=True)
            return [chunk async for chunk in stream]

    chunks = asyncio.run(streamed())
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason


def test_concurrent_async_requests_each_get_their_own_answer(server, reference):
    async def streamed(aclient, prompt: str) -> str:
        stream = await aclient.completions.create(model="tiny", prompt=prompt, stream=True,
                                                  max_tokens=MAX_TOKENS, temperature=0)
        return "".join([chunk.choices[0].text async for chunk in stream])

    async def ask_all() -> list[str]:
        async with openai.AsyncOpenAI(base_url=server.base_url, api_key="unused",
                                      max_retries=0) as aclient:
            replies = await asyncio.gather(*(aclient.completions.create(
                model="tiny", prompt=p, max_tokens=MAX_TOKENS, temperature=0)
                for p in PROMPTS))
            texts = await asyncio.gather(*(streamed(aclient, p) for p in PROMPTS))
            return [r.choices[0].text for r in replies] + texts

    assert asyncio.run(ask_all()) == engine_texts(reference, PROMPTS * 2)


def test_stop_strings_and_seeds(client):
    full = client.completions.create(model="tiny", prompt="hello", max_tokens=MAX_TOKENS,
                                     temperature=0).choices[0].text
    stop = full[5:7]
    cut = client.completions.create(model="tiny", prompt="hello", max_tokens=MAX_TOKENS,
                                    temperature=0, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop" and cut.text == full[:full.find(stop)]
    streamed = client.completions.create(model="tiny", prompt="hello", max_tokens=MAX_TOKENS,
                                         temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut.text
    sampled = [client.completions.create(model="tiny", prompt="hello", max_tokens=MAX_TOKENS,
                                         temperature=1.0, top_p=0.9, seed=7,
                                         extra_body=LONG).choices[0].text for _ in range(2)]
    assert sampled[0] == sampled[1]


@pytest.mark.parametrize("kwargs,param", [
    (dict(n=2), "n"),
    (dict(logprobs=2), "logprobs"),
    (dict(echo=True), "echo"),
    (dict(temperature=3.0), "temperature"),
    (dict(extra_body={"frobnicate": 1}), "frobnicate"),
    (dict(stream_options={"include_usage": True}), "stream_options"),
    (dict(prompt=[1000]), "prompt"),
    (dict(prompt=["a", "b"]), "prompt"),
    (dict(max_tokens=5000), "max_tokens"),
])
def test_bad_completion_requests_get_400(client, kwargs, param):
    fields = {"model": "tiny", "prompt": "hi", "max_tokens": 4, **kwargs}
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(**fields)
    error = caught.value.body
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert error["message"]


def test_chat_features_we_do_not_have_get_400(client):
    tool = {"type": "function", "function": {"name": "f", "parameters": {}}}
    for kwargs in (dict(tools=[tool]), dict(logprobs=True), dict(n=3)):
        with pytest.raises(openai.BadRequestError, match="not supported|must be 1"):
            client.chat.completions.create(model="tiny", messages=[{"role": "user",
                                                                    "content": "x"}], **kwargs)
    with pytest.raises(openai.BadRequestError, match="role 'tool'"):
        client.chat.completions.create(model="tiny", messages=[{"role": "tool",
                                                                "content": "x"}])


def test_unknown_model_404_and_raw_error_bodies(server, client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    assert caught.value.body["code"] == "model_not_found"
    raw = httpx.post(f"{server.base_url}/completions", content=b"{not json",
                     headers={"Content-Type": "application/json"}, timeout=10)
    assert raw.status_code == 400
    assert set(raw.json()["error"]) == {"message", "type", "param", "code"}
    missing = httpx.post(f"{server.base_url}/chat/completions", json={"model": "tiny"},
                         timeout=10)
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "messages"
    assert httpx.get(f"{server.base_url}/nowhere", timeout=10).status_code == 404
    # and it keeps serving
    assert client.completions.create(model="tiny", prompt="hi", max_tokens=2).choices


def test_a_stream_cut_by_the_client_frees_its_kv_blocks(server, client):
    aborted = metric(server, "readmoe_requests_finished_total{reason=\"abort\"}")
    stream = client.completions.create(model="tiny", prompt="hello", max_tokens=800,
                                       temperature=0, stream=True, extra_body=LONG)
    for _, _chunk in zip(range(3), stream, strict=False):
        pass
    assert metric(server, "readmoe_kv_blocks_in_use") > 0
    stream.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and metric(server, "readmoe_kv_blocks_in_use") > 0:
        time.sleep(0.05)
    assert metric(server, "readmoe_kv_blocks_in_use") == 0
    assert metric(server, "readmoe_kv_blocks_reserved") == 0
    assert metric(server, "readmoe_requests_running") == 0
    assert metric(server, "readmoe_requests_finished_total{reason=\"abort\"}") == aborted + 1
    assert metric(server, "readmoe_generation_tokens_total") > 0
    assert metric(server, "readmoe_time_to_first_token_seconds_count") > 0
