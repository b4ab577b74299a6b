"""The engine loop thread and its asyncio side, without HTTP: outputs arrive in order and the
engine forgets finished requests; a full queue refuses with 503; a failing step fails its
requests with 500 and the loop goes on serving; closing a stream aborts its request."""

from __future__ import annotations

import asyncio
import time

import pytest

from readmoe.serve.engine import Engine
from readmoe.serve.sampling import SamplingParams
from readmoe.server.bridge import EngineLoop
from readmoe.server.errors import APIError
from tests.server.helpers import tiny_chat_tokenizer, tiny_served_model

PROMPT = [5, 9, 14, 3, 70]


@pytest.fixture
def engine():
    return Engine(tiny_served_model(), tiny_chat_tokenizer(), kv_blocks=64, block_size=4)


def run(loop: EngineLoop, coroutine):
    loop.start()
    try:
        return asyncio.run(coroutine)
    finally:
        loop.stop()


def idle(loop: EngineLoop) -> bool:
    deadline = time.monotonic() + 10
    while loop.state.running or loop.state.kv_blocks_used:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_outputs_in_order_then_forgotten(engine):
    expected = Engine(tiny_served_model(), tiny_chat_tokenizer()).generate(
        [PROMPT], SamplingParams(max_tokens=6))[0].token_ids
    loop = EngineLoop(engine, max_queue=4)

    async def collect() -> list:
        return [out async for out in loop.submit(PROMPT, SamplingParams(max_tokens=6))]

    outputs = run(loop, collect())
    assert [t for out in outputs for t in out.new_token_ids] == expected
    assert outputs[-1].finished and not any(out.finished for out in outputs[:-1])
    assert not engine.has_unfinished() and engine.metrics()["requests"] == 0  # released
    assert engine.kv.num_free == engine.kv.num_blocks


def test_full_queue_refuses_with_retry_after(engine):
    loop = EngineLoop(engine, max_queue=0, retry_after_s=3)

    async def submit():
        loop.submit(PROMPT, SamplingParams())

    with pytest.raises(APIError) as caught:
        run(loop, submit())
    assert caught.value.status == 503 and caught.value.headers == {"Retry-After": "3"}


def test_a_failing_step_fails_its_requests_and_the_loop_goes_on(engine, monkeypatch):
    real_step = engine.step
    calls = []

    def flaky_step():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real_step()

    monkeypatch.setattr(engine, "step", flaky_step)
    loop = EngineLoop(engine, max_queue=4)

    async def scenario():
        with pytest.raises(APIError) as caught:
            async for _ in loop.submit(PROMPT, SamplingParams(max_tokens=5)):
                pass
        assert caught.value.status == 500 and "boom" in caught.value.message
        return [out async for out in loop.submit(PROMPT, SamplingParams(max_tokens=3))][-1]

    assert run(loop, scenario()).finished
    assert loop.failure == "RuntimeError: boom" and engine.kv.num_free == engine.kv.num_blocks


def test_closing_a_stream_aborts_its_request(engine):
    loop = EngineLoop(engine, max_queue=4)

    async def scenario() -> bool:
        stream = loop.submit(PROMPT, SamplingParams(max_tokens=50, ignore_eos=True))
        await anext(stream)
        stream.close()
        return await asyncio.to_thread(idle, loop)

    assert run(loop, scenario())
    assert not engine.has_unfinished() and engine.kv.num_free == engine.kv.num_blocks
