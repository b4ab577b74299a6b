"""`readmoe generate` and `readmoe chat` on a tiny model: the engine's text, streamed; a chat
keeps its history; Ctrl-C ends a reply between two steps and frees its KV blocks; Ctrl-D
ends the chat."""

from __future__ import annotations

import os
import signal

import pytest

from readmoe.cli import main
from readmoe.models.device import resolve_placement
from readmoe.serve import launch
from readmoe.serve.launch import EngineOptions, open_engine
from readmoe.serve.sampling import SamplingParams
from readmoe.server.terminal import ChatSession, stream_reply

GREEDY = SamplingParams(max_tokens=10)


@pytest.fixture
def served(model_dir):
    with open_engine(str(model_dir), EngineOptions(max_seqs=1), resolve_placement("cpu")) as s:
        yield s


def test_generate_prints_the_engines_text(model_dir, served, capsys):
    expected = served.engine.generate(["hello"], GREEDY)[0].text
    assert main(["generate", str(model_dir), "hello", "--max-tokens", "10", "--temperature",
                 "0", "--device", "cpu"]) == 0
    assert capsys.readouterr().out == expected + "\n"
    messages = [{"role": "user", "content": "hello"}]
    prompt = served.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=True)
    chat = served.engine.generate([served.tokenizer.encode(prompt, add_special_tokens=False)],
                                  GREEDY)[0].text
    assert main(["generate", str(model_dir), "hello", "--chat", "--max-tokens", "10",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out == chat + "\n"


def test_generate_takes_the_precision_flags(model_dir, capsys, monkeypatch):
    options = EngineOptions(max_seqs=1, kv_dtype="float16", quantize="int8")
    with open_engine(str(model_dir), options, resolve_placement("cpu")) as served:
        expected = served.engine.generate(["hello"], GREEDY)[0].text
    seen = []

    def spy(spec, options, placement):
        seen.append(options)
        return open_engine(spec, options, placement)

    monkeypatch.setattr(launch, "open_engine", spy)
    assert main(["generate", str(model_dir), "hello", "--max-tokens", "10", "--temperature",
                 "0", "--device", "cpu", "--kv-dtype", "float16", "--quantize", "int8"]) == 0
    assert capsys.readouterr().out == expected + "\n"
    assert (seen[0].quantize, seen[0].kv_dtype) == ("int8", "float16")


def test_chat_keeps_history_until_end_of_input(served):
    lines = iter(["hi", "", "and again"])

    def read(prompt: str) -> str:
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    written: list[str] = []
    session = ChatSession(served, GREEDY, system="short answers")
    assert session.run(read, written.append) == 0
    assert [t["role"] for t in session.turns] == ["user", "assistant", "user", "assistant"]
    first = session.turns[1]["content"]
    transcript = "".join(written)
    assert transcript.startswith(first + "\n") and transcript.endswith("\n\n")
    assert served.engine.kv.num_free == served.engine.kv.num_blocks


def test_ctrl_c_ends_a_reply_between_steps(served):
    long = SamplingParams(max_tokens=200, ignore_eos=True)
    written: list[str] = []

    def write(text: str) -> None:
        written.append(text)
        if len(written) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends

    ids = served.tokenizer.encode("hello")
    reply = stream_reply(served, ids, long, write)
    assert reply.interrupted and reply.finish_reason == "abort"
    assert 3 <= len(written) < 200 and reply.text == "".join(written)
    assert served.engine.kv.num_free == served.engine.kv.num_blocks
    assert not served.engine.has_unfinished()
    whole = stream_reply(served, ids, SamplingParams(max_tokens=5), lambda _: None)
    assert not whole.interrupted  # the engine goes on serving


def test_ctrl_c_at_the_prompt_asks_again(served):
    answers = iter([KeyboardInterrupt(), "hi", EOFError()])

    def read(prompt: str) -> str:
        item = next(answers)
        if isinstance(item, BaseException):
            raise item
        return item

    session = ChatSession(served, SamplingParams(max_tokens=3))
    assert session.run(read, lambda _: None) == 0
    assert len(session.turns) == 2
