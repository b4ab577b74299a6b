"""The terminal front end: `readmoe generate` (one answer to stdout) and `readmoe chat`.

Both run the engine in process and stream text as it is produced (``IncrementalText``, the
server's detokeniser, so the terminal prints exactly what the HTTP API would send). Ctrl-C
during a reply sets a flag the token loop checks, so the engine is never interrupted in the
middle of a step: the request is aborted between two steps, its KV blocks freed, and the
chat goes on with the partial reply in its history. Ctrl-D (end of input) quits the chat.
When a conversation outgrows the context, its oldest turns are dropped (the system message
stays).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from readmoe.errors import ReadmoeError
from readmoe.serve.launch import ServedEngine
from readmoe.serve.sampling import SamplingParams
from readmoe.server.errors import APIError
from readmoe.server.prompts import chat_ids
from readmoe.server.text import IncrementalText

Write = Callable[[str], None]


@dataclass(frozen=True)
class Reply:
    text: str
    interrupted: bool
    finish_reason: str | None


@contextlib.contextmanager
def interrupt_flag() -> Iterator[threading.Event]:
    """An event set by Ctrl-C (SIGINT) while the block runs, instead of KeyboardInterrupt."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = signal.signal(signal.SIGINT, lambda *_: flag.set())
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def stream_reply(served: ServedEngine, prompt_ids: Sequence[int], params: SamplingParams,
                 write: Write) -> Reply:
    """Generate from ``prompt_ids``, writing text as it comes; Ctrl-C stops it cleanly."""
    engine = served.engine
    text = IncrementalText(served.tokenizer, params.stop)
    shown = []
    request_id = engine.add_request(list(prompt_ids), params)
    with interrupt_flag() as interrupted:
        for token in engine.stream(request_id):
            shown.append(text.push([token]))
            write(shown[-1])
            if interrupted.is_set():
                engine.abort(request_id)
                break
    output = engine.release(request_id)
    if output.finish_reason == "abort":
        return Reply("".join(shown), True, "abort")
    shown.append(text.finish(output.text))
    write(shown[-1])
    return Reply("".join(shown), False, output.finish_reason)


def encode_chat(served: ServedEngine, messages: Sequence[dict]) -> list[int]:
    try:
        return chat_ids(served.tokenizer, messages)
    except APIError as exc:
        raise ReadmoeError(exc.message) from None


class ChatSession:
    """A conversation: history, chat template, one streamed reply per user turn."""

    def __init__(self, served: ServedEngine, params: SamplingParams,
                 system: str | None = None) -> None:
        self.served, self.params = served, params
        self.system = [{"role": "system", "content": system}] if system else []
        self.turns: list[dict] = []

    def _prompt(self) -> list[int]:
        """The chat's ids, dropping the oldest turns until the reply fits the context."""
        limit = self.served.max_model_len - self.params.max_tokens
        while True:
            ids = encode_chat(self.served, self.system + self.turns)
            if len(ids) <= limit:
                return ids
            if len(self.turns) <= 1:
                raise ReadmoeError(f"the message needs {len(ids)} tokens but only {limit} fit "
                                   "beside the reply: shorten it or lower --max-tokens")
            del self.turns[:2]  # the oldest user turn and its reply

    def reply(self, message: str, write: Write) -> Reply:
        self.turns.append({"role": "user", "content": message})
        reply = stream_reply(self.served, self._prompt(), self.params, write)
        self.turns.append({"role": "assistant", "content": reply.text})
        return reply

    def run(self, read: Callable[[str], str], write: Write) -> int:
        """Read a line, answer it, until end of input; returns the exit status."""
        while True:
            try:
                line = read(">>> ")
            except EOFError:
                write("\n")
                return 0
            except KeyboardInterrupt:  # at the prompt: a fresh line, as a shell does
                write("\n")
                continue
            if not line.strip():
                continue
            reply = self.reply(line, write)
            write(" [interrupted]\n" if reply.interrupted else "\n")
