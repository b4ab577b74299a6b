"""The engine loop: one background thread that owns the engine, and an asyncio side per request.

Why a thread: ``Engine.step`` is a blocking forward pass, and the engine's state (queue, KV
blocks, expert store) must have one owner. The HTTP handlers never touch the engine: they put
commands on a thread-safe queue (add, abort, stop) and read outputs from their own
``asyncio.Queue``, which the loop fills once per step with ``call_soon_threadsafe``. The loop
applies every pending command between steps, so an abort (a client that went away) frees its
KV blocks and leaves the scheduler's and the expert cache's view before the next step; idle,
it sleeps on the command queue.

Back-pressure: ``submit`` refuses (503 with Retry-After) when ``max_queue`` requests already
wait for the engine, i.e. are in flight but not running, so memory stays bounded however fast
clients send. ``in_flight`` is counted under a lock on the asyncio side; ``running`` is the
loop's last published ``EngineState``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from time import perf_counter

from readmoe.errors import ReadmoeError
from readmoe.serve.engine import Engine, RequestOutput
from readmoe.serve.sampling import SamplingParams
from readmoe.server.errors import SERVER, APIError

log = logging.getLogger("readmoe.server")


@dataclass(frozen=True)
class EngineState:
    """What the loop published after its last step (read by /metrics and back-pressure)."""

    running: int = 0
    waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_reserved: int = 0
    kv_blocks_total: int = 0
    expert_hits: int = 0
    expert_misses: int = 0
    expert_bytes_loaded: int = 0
    expert_slots_resident: int = 0
    expert_slots_total: int = 0
    steps: int = 0


class RequestStream:
    """The asyncio side of one request: its outputs, in order, ending with a finished one.

    ``close()`` (on a client that went away, or a cancelled handler) aborts the request if
    it has not finished."""

    def __init__(self, loop: EngineLoop, request_id: str, prompt_len: int) -> None:
        self.request_id, self.prompt_len = request_id, prompt_len
        self._loop = loop
        self._outputs: asyncio.Queue[RequestOutput | APIError] = asyncio.Queue()
        self._event_loop = asyncio.get_running_loop()
        self.done = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.done:
            raise StopAsyncIteration
        item = await self._outputs.get()
        if isinstance(item, APIError):
            self.done = True
            raise item
        self.done = item.finished
        return item

    def close(self) -> None:
        if not self.done:
            self.done = True
            self._loop.abort(self.request_id)

    def _put(self, item: RequestOutput | APIError) -> None:
        _post([(self, item)])


def _post(items: Sequence[tuple[RequestStream, RequestOutput | APIError]]) -> None:
    """Hand outputs to their streams: one wake-up per event loop for a whole step's tokens
    (each wake-up costs the event loop a pipe write and the engine thread the GIL)."""
    by_loop: dict[asyncio.AbstractEventLoop, list] = {}
    for stream, item in items:
        by_loop.setdefault(stream._event_loop, []).append((stream, item))
    for event_loop, batch in by_loop.items():
        with contextlib.suppress(RuntimeError):  # a closed event loop: nobody listens any more
            event_loop.call_soon_threadsafe(_deliver, batch)


def _deliver(batch: list[tuple[RequestStream, RequestOutput | APIError]]) -> None:
    for stream, item in batch:
        stream._outputs.put_nowait(item)


@dataclass
class _Entry:
    stream: RequestStream
    submitted: float
    last_output: float | None = None


class EngineLoop:
    """Runs ``engine`` in a thread; ``metrics`` (a ``ServerMetrics``) observes every token."""

    def __init__(self, engine: Engine, max_queue: int, metrics=None,
                 retry_after_s: int = 1) -> None:
        self.engine, self.max_queue, self.metrics = engine, max_queue, metrics
        self.retry_after_s = retry_after_s
        self.state = EngineState(kv_blocks_total=engine.kv.num_blocks)
        self.failure: str | None = None
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._in_flight = 0
        self._draining = False
        self._entries: dict[str, _Entry] = {}  # owned by the loop thread
        self._thread = threading.Thread(target=self._run, name="readmoe-engine", daemon=True)

    # -- the asyncio side -------------------------------------------------------------------

    def start(self) -> None:
        self._publish()
        self._thread.start()

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams,
               prefix: str = "cmpl") -> RequestStream:
        """Queue a request (call from the event loop); 503 when draining or the queue is full."""
        with self._lock:
            if self._draining:
                raise APIError(503, "the server is shutting down and takes no new requests",
                               kind=SERVER, code="shutting_down")
            if not self.alive:
                why = self.failure or "not running"
                raise APIError(503, f"the engine loop has stopped ({why}); restart the server",
                               kind=SERVER, code="engine_stopped")
            waiting = self._in_flight - self.state.running
            if waiting >= self.max_queue:
                raise APIError(503, f"the server is at capacity ({waiting} requests waiting, "
                               f"--max-queue {self.max_queue}); retry after "
                               f"{self.retry_after_s} s", kind=SERVER, code="queue_full",
                               headers={"Retry-After": str(self.retry_after_s)})
            self._in_flight += 1
        stream = RequestStream(self, f"{prefix}-{uuid.uuid4().hex}", len(prompt_ids))
        self._commands.put(("add", stream, list(prompt_ids), params, perf_counter()))
        return stream

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def drain(self) -> None:
        """Refuse new requests from now on; those in flight go on."""
        with self._lock:
            self._draining = True

    def stop(self, timeout: float = 10.0) -> None:
        """Abort whatever is left and end the thread."""
        self.drain()
        if self.alive:
            self._commands.put(("stop",))
            self._thread.join(timeout)

    # -- the loop thread --------------------------------------------------------------------

    def _run(self) -> None:
        while self._take_commands(block=not self.engine.has_unfinished()):
            if self.engine.has_unfinished():
                self._step()
            self._publish()

    def _take_commands(self, block: bool) -> bool:
        """Apply every queued command (waiting for one when ``block``); False on stop."""
        try:
            command = self._commands.get(block=block)
        except queue.Empty:
            return True
        while True:
            if command[0] == "stop":
                self._fail_all(APIError(503, "the server shut down before the request finished",
                                        kind=SERVER, code="shutting_down"))
                return False
            if command[0] == "add":
                self._add(*command[1:])
            else:
                self._drop(command[1])
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return True

    def _add(self, stream: RequestStream, ids: list[int], params: SamplingParams,
             submitted: float) -> None:
        try:
            self.engine.add_request(ids, params, request_id=stream.request_id)
        except ReadmoeError as exc:
            self._release()
            stream._put(APIError(400, str(exc)))
            return
        self._entries[stream.request_id] = _Entry(stream, submitted)

    def _drop(self, request_id: str) -> None:
        """Abort a request whose client is gone: its KV blocks are free before the next step."""
        if self._entries.pop(request_id, None) is None:
            return  # it had finished meanwhile
        self.engine.abort(request_id)
        self.engine.release(request_id)
        self._release()
        if self.metrics is not None:
            self.metrics.finished.labels("abort").inc()

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as exc:  # a broken step must not hang every client: fail them all
            log.exception("engine step failed")
            self.failure = f"{type(exc).__name__}: {exc}"
            self._fail_all(APIError(500, f"the engine failed ({self.failure}); the request was "
                                    "aborted", kind=SERVER, code="engine_error"))
            return
        now = perf_counter()
        delivered = []
        for output in outputs:
            entry = self._entries.get(output.request_id)
            if entry is None:
                continue
            if self.metrics is not None:
                self.metrics.observe(entry.submitted, entry.last_output, now, output,
                                     entry.stream.prompt_len)
            entry.last_output = now
            delivered.append((entry.stream, output))
            if output.finished:
                del self._entries[output.request_id]
                self.engine.release(output.request_id)
                self._release()
        _post(delivered)

    def _fail_all(self, error: APIError) -> None:
        for request_id in self._entries:
            self.engine.abort(request_id)
            self.engine.release(request_id)
            self._release()
        _post([(entry.stream, error) for entry in self._entries.values()])
        self._entries.clear()

    def _release(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def _publish(self) -> None:
        engine, kv = self.engine, self.engine.kv
        running = len(engine.queue.running)
        with self._lock:
            waiting = self._in_flight - running
        fields = {}
        store = engine.store
        if store is not None:
            stats = store.stats
            fields = {"expert_hits": stats.hits, "expert_misses": stats.misses,
                      "expert_bytes_loaded": stats.bytes_moved,
                      "expert_slots_resident": sum(len(store.cache.resident(layer))
                                                   for layer in store.routed_layers),
                      "expert_slots_total": store.capacity * len(store.routed_layers)}
        self.state = EngineState(running=running, waiting=waiting,
                                 kv_blocks_used=kv.num_blocks - kv.num_free,
                                 kv_blocks_reserved=kv.num_free - kv.num_available,
                                 kv_blocks_total=kv.num_blocks, steps=engine.num_steps,
                                 **fields)
