"""`readmoe serve`: the app on uvicorn, with a graceful shutdown that exits 0.

SIGINT or SIGTERM: the engine loop stops taking requests (503, /health says draining),
uvicorn closes its listening socket and waits up to ``grace_s`` for the requests in flight to
finish, then cancels the rest (each aborts its request); the lifespan's end stops the loop
and the process exits 0. A second Ctrl-C skips the wait. uvicorn's own signal capture would
re-raise the signal after shutting down (exit status 130 or -15), which a supervisor reads as
a crash; ``_Server`` installs handlers that do not.

The socket is bound before uvicorn starts, so ``--port 0`` gets a free port and the line
``readmoe serve: listening on http://HOST:PORT`` (printed once requests are accepted) names
it: tests and the demo read that line.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace

import uvicorn

from readmoe.errors import ReadmoeError
from readmoe.models.device import Placement
from readmoe.serve.launch import EngineOptions, open_engine
from readmoe.server.app import build_app
from readmoe.server.config import LISTENING, ServerConfig

STEP_HISTORY = 10_000
"""Engine step reports a server keeps (the rest are dropped, so its memory stays flat)."""


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, on_signal: Callable[[], None],
                 on_started: Callable[[], None]) -> None:
        super().__init__(config)
        self.on_signal, self.on_started = on_signal, on_started

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handle(sig: int, frame) -> None:
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            self.on_signal()
            self.should_exit = True

        original = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self.on_started()


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (0: a free port), for uvicorn to listen on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ReadmoeError(f"cannot listen on {host}:{port} ({exc.strerror}): choose another "
                           "--port (0 picks a free one) or --host") from None
    sock.set_inheritable(True)
    return sock


def run_server(model: str, config: ServerConfig, options: EngineOptions,
               placement: Placement) -> int:
    """Serve ``model`` until SIGINT/SIGTERM; returns 0 after a clean shutdown."""
    config.validate()
    options = replace(options, step_history=options.step_history or STEP_HISTORY)
    name = config.served_model_name or model
    sock = bind(config.host, config.port)
    try:
        with open_engine(model, options, placement) as served:
            app = build_app(served, config, name)
            host, port = sock.getsockname()[:2]
            where = f"[{host}]" if ":" in host else host

            def started() -> None:
                print(f"{LISTENING} http://{where}:{port} (model {name!r}, "
                      f"{placement.describe()}, {served.experts['store']})", flush=True)

            server = _Server(uvicorn.Config(app, log_level="info", access_log=config.access_log,
                                            timeout_graceful_shutdown=config.grace_s,
                                            lifespan="on"),
                             on_signal=app.state.loop.drain, on_started=started)
            server.run(sockets=[sock])
    finally:
        sock.close()
    print("readmoe serve: stopped", flush=True)
    return 0
