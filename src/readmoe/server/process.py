"""`readmoe serve` as a child process: what the demo, the load benchmarks and the tests start.

It runs ``python -m readmoe.cli serve MODEL --port 0 ...`` and waits (bounded) for the line
the server prints once it accepts requests, which names the free port it got (``listening``,
which a server of another backend overrides); it is stopped
through the process id it started (SIGTERM, SIGKILL only if the grace runs out), so nothing
else on the machine is ever signalled.
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

from readmoe.errors import ReadmoeError
from readmoe.server.config import LISTENING


class ServerProcess:
    """``with ServerProcess(model, *flags) as server:`` -> ``server.url``, ``server.base_url``."""

    def __init__(self, model: str | Path, *args: str, env: dict[str, str] | None = None,
                 host: str = "127.0.0.1", start_timeout_s: float = 120.0, port: int = 0) -> None:
        self.command = [sys.executable, "-m", "readmoe.cli", "serve", str(model), "--host", host,
                        "--port", str(port), *args]
        self.host, self.port = host, port
        self.env = {**os.environ, **(env or {})}
        self.start_timeout_s = start_timeout_s
        self.output: list[str] = []
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self._lines: queue.Queue[str | None] = queue.Queue()

    def __enter__(self) -> ServerProcess:
        self.proc = subprocess.Popen(self.command, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=self.env)
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + self.start_timeout_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                raise ReadmoeError(f"readmoe serve exited before listening:\n{self.log()}")
            url = self.listening(line)
            if url is not None:
                self.url = url
                return self
        self.stop()
        raise ReadmoeError(f"readmoe serve did not start in {self.start_timeout_s:.0f} s:\n"
                           f"{self.log()}")

    def listening(self, line: str) -> str | None:
        """The server's URL if ``line`` says it now accepts requests, else None."""
        return line[len(LISTENING):].split()[0] if line.startswith(LISTENING) else None

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.output.append(line)
            self._lines.put(line)
        self._lines.put(None)

    def log(self) -> str:
        return "".join(self.output[-40:])

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Signal the server and wait for it; returns its exit status."""
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
