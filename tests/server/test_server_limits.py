"""The server's limits and lifecycle: API keys (flag or environment), back-pressure (503 with
Retry-After when the waiting queue is full), and SIGTERM: stop accepting, let the request in
flight finish within the grace period, or cut it once the grace is over; exit 0 either way."""

from __future__ import annotations

import asyncio
import signal
import threading
import time

import httpx
import openai
import pytest

from readmoe.server.config import API_KEY_ENV, api_key_from
from tests.server.helpers import ServerProcess

KEY = "sk-test-123"
LONG = {"ignore_eos": True}


def test_api_key_flag_wins_over_the_environment(monkeypatch):
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert api_key_from(None) == "from-env" and api_key_from("flag") == "flag"
    monkeypatch.delenv(API_KEY_ENV)
    assert api_key_from(None) is None


def test_keys_and_a_full_queue(model_dir):
    with ServerProcess(model_dir, "--served-model-name", "tiny", "--max-seqs", "1",
                       "--max-queue", "1", env={API_KEY_ENV: KEY}) as server:
        with openai.OpenAI(base_url=server.base_url, api_key="wrong", max_retries=0) as bad:
            with pytest.raises(openai.AuthenticationError) as caught:
                bad.models.list()
            assert caught.value.body["code"] == "invalid_api_key"
        missing = httpx.get(f"{server.base_url}/models", timeout=10)
        assert missing.status_code == 401 and "missing API key" in missing.json()["error"][
            "message"]
        garbage = httpx.post(f"{server.base_url}/completions", content=b"{oops", timeout=10)
        assert garbage.status_code == 401  # the key is checked before the body is read
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200  # no key needed
        assert asyncio.run(_fill_the_queue(server)) == 5


async def _fill_the_queue(server) -> int:
    """One running request, one waiting: the third gets 503 with Retry-After; the waiting one
    still completes once the running one is cut."""
    async with openai.AsyncOpenAI(base_url=server.base_url, api_key=KEY,
                                  max_retries=0) as client:
        running = await client.completions.create(model="tiny", prompt="a", max_tokens=900,
                                                  stream=True, extra_body=LONG)
        await anext(aiter(running))
        waiting = asyncio.create_task(client.completions.create(
            model="tiny", prompt="b", max_tokens=5, extra_body=LONG))
        async with httpx.AsyncClient() as http:
            for _ in range(200):
                metrics = (await http.get(f"{server.url}/metrics")).text
                if "readmoe_requests_waiting 1.0" in metrics:
                    break
                await asyncio.sleep(0.02)
        with pytest.raises(openai.APIStatusError) as caught:
            await client.completions.create(model="tiny", prompt="c", max_tokens=2)
        assert caught.value.status_code == 503
        assert caught.value.response.headers["retry-after"] == "1"
        assert caught.value.body["code"] == "queue_full"
        await running.close()
        return (await waiting).usage.completion_tokens


def _stream_in_thread(server, max_tokens: int, events: list) -> threading.Thread:
    def consume() -> None:
        with openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0) as client:
            try:
                for chunk in client.completions.create(model="tiny", prompt="go", stream=True,
                                                       max_tokens=max_tokens, extra_body=LONG):
                    events.append(chunk.choices[0].finish_reason or "token")
            except (openai.APIError, httpx.HTTPError) as exc:
                events.append(type(exc).__name__)

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not events and time.monotonic() < deadline:
        time.sleep(0.01)
    assert events, "the stream did not start"
    return thread


@pytest.mark.parametrize("grace,max_tokens,ends_with", [("30", 300, "length"),
                                                        ("0.3", 1000, None)])
def test_sigterm_drains_then_exits_0(model_dir, grace, max_tokens, ends_with):
    with ServerProcess(model_dir, "--served-model-name", "tiny", "--grace", grace) as server:
        events: list = []
        thread = _stream_in_thread(server, max_tokens, events)
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        with pytest.raises(httpx.HTTPError):  # the listening socket is closed at once
            httpx.get(f"{server.url}/health", timeout=2)
        assert server.proc.wait(60) == 0
        thread.join(30)
        assert "readmoe serve: stopped\n" in server.output
    if ends_with is not None:
        assert events[-1] == ends_with and events.count("token") == max_tokens - 1
    else:  # the grace ran out: the stream was cut before its end
        assert events.count("token") < max_tokens - 1 and "length" not in events
