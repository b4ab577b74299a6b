"""A tiny ReadME model folder a server can load, and a real `readmoe serve` subprocess.

The server is started as `python -m readmoe.cli serve DIR --port 0` bound to 127.0.0.1 and
found by the line it prints once it accepts requests; it is stopped by the process id this
helper started (SIGTERM, then SIGKILL after a bounded wait), never by name.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from readmoe.refactor.slicing import save_readme
from readmoe.server.run import LISTENING
from tests.conftest import char_tokenizer
from tests.model.test_modeling_readme import tiny_readme

VOCAB = 128
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")
START_TIMEOUT_S = 90.0


def tiny_chat_tokenizer():
    tokenizer = char_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_served_model(seed: int = 0):
    """A tiny ReadME model with a pre-gating router (routing is real in every step)."""
    model = tiny_readme(seed, vocab_size=VOCAB, max_position_embeddings=1024)
    model.attach_router("pregating", seed=seed)
    return model.eval()


def save_tiny_model(folder: Path, seed: int = 0) -> Path:
    return save_readme(tiny_served_model(seed), folder, tokenizer=tiny_chat_tokenizer())


class ServerProcess:
    """`readmoe serve MODEL --port 0 ARGS...` in a subprocess, as a context manager."""

    def __init__(self, model: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.command = [sys.executable, "-m", "readmoe.cli", "serve", str(model), "--host",
                        "127.0.0.1", "--port", "0", "--device", "cpu", *args]
        self.env = {**os.environ, **(env or {})}
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.output: list[str] = []
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def __enter__(self) -> ServerProcess:
        self.proc = subprocess.Popen(self.command, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=self.env)
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                raise AssertionError(f"the server exited: {''.join(self.output)}")
            if line.startswith(LISTENING):
                self.url = line.split()[4]
                return self
        self.stop()
        raise AssertionError(f"the server did not start in {START_TIMEOUT_S} s: "
                             f"{''.join(self.output)}")

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.output.append(line)
            self.lines.put(line)
        self.lines.put(None)

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal the server (by its pid) and wait for it; returns its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        return self.proc.returncode

    def __exit__(self, *exc: object) -> None:
        self.stop()
