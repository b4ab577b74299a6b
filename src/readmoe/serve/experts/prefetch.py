"""Overlapping expert loads with compute: layer ``l + 1``'s missing experts load while layer
``l`` computes.

Why it is possible: the pre-gating router has chosen every scheduled token's expert before the
backbone runs, so the experts of every layer of the step are known when the step starts.

``AsyncLoader`` is the copy engine: one worker thread fed by one queue, so loads run one at a
time in the order issued (urgent ones first), like one copy stream. On CUDA its copies go on a
side stream from pinned host memory, after the compute stream's work queued so far (an evicted
slot may still be read by it); the worker waits for the copy's event before it reports a load
done, so "done" means the bytes are on the device; the caller's stream then waits on that event too.
A load in flight for a key the caller needs is waited on, never issued twice.

``StepAccess`` is what an engine's runner asks for weights during one step (``run_layers``
drives it with a stand-in compute): at the step's start layer 0's loads are issued; then for
each layer, take its experts (waiting only for loads not yet done), issue the next routed
layer's loads once this layer's own serial loads are done (at once when it has none, as the
simulator's timeline orders the copy stream), and compute. Cache accesses thus happen in layer
order at ``step * num_layers + layer``, exactly as in the simulator, so hit ratios agree.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING

import torch

from readmoe.errors import ReadmoeError
from readmoe.serve.experts.future import ExpertKey, FutureUses
from readmoe.serve.experts.link import EmulatedLink

if TYPE_CHECKING:
    from readmoe.serve.experts.store import ExpertStore, ExpertWeights


class AsyncLoader:
    """A single background copy worker; ``load_s`` sums the seconds its loads took.

    Loads run in the order issued, except ``urgent`` ones, which go to the front of the
    queue: a load the compute is already waiting for (one that had to wait for the expert it
    evicts) must not queue behind the next layer's prefetches.
    """

    def __init__(self, device: torch.device, link: EmulatedLink | None = None) -> None:
        self.link = link
        self.load_s = 0.0
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._queue: deque[tuple[Future, Callable[[], None], int, torch.cuda.Event | None]] = (
            deque())
        self._inflight: dict[ExpertKey, Future] = {}
        self._ready = threading.Condition()
        self._closed = False
        self._worker = threading.Thread(target=self._work, name="expert-loader", daemon=True)
        self._worker.start()

    def submit(self, key: ExpertKey, copy: Callable[[], None], nbytes: int,
               urgent: bool = False) -> Future:
        """Queue ``copy`` (which fills ``key``'s slot); a load of ``key`` in flight is reused."""
        with self._ready:
            if self._closed:
                raise ReadmoeError("the expert loader is closed")
            running = self._inflight.get(key)
            if running is not None and not running.done():
                return running
            ready = None
            if self._stream is not None:  # the slot may still be read by queued compute
                ready = torch.cuda.Event()
                ready.record(torch.cuda.current_stream(self._stream.device))
            future: Future = Future()
            item = (future, copy, nbytes, ready)
            (self._queue.appendleft if urgent else self._queue.append)(item)
            self._inflight[key] = future
            self._ready.notify()
            return future

    def _work(self) -> None:
        while True:
            with self._ready:
                while not self._queue and not self._closed:
                    self._ready.wait()
                if not self._queue:
                    return  # closed and drained
                future, copy, nbytes, ready = self._queue.popleft()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(self._run(copy, nbytes, ready))
            except BaseException as exc:  # the caller re-raises it from future.result()
                future.set_exception(exc)

    def _run(self, copy: Callable[[], None], nbytes: int,
             ready: torch.cuda.Event | None) -> torch.cuda.Event | None:
        started = time.perf_counter()
        event = None
        if self._stream is not None:
            self._stream.wait_event(ready)
            with torch.cuda.stream(self._stream):
                copy()
                event = torch.cuda.Event()
                event.record(self._stream)
            event.synchronize()
        else:
            copy()
        if self.link is not None:
            self.link.hold(started, nbytes)
        self.load_s += time.perf_counter() - started  # only this worker thread writes it
        return event

    def wait(self, futures: Iterable[Future]) -> float:
        """Block until ``futures`` are done; return the seconds the caller waited."""
        started = time.perf_counter()
        for future in futures:
            event = future.result()
            if event is not None:
                torch.cuda.current_stream().wait_event(event)
        return time.perf_counter() - started

    def close(self) -> None:
        """Finish the queued loads, then stop the worker."""
        with self._ready:
            self._closed = True
            self._ready.notify()
        self._worker.join()


class StepAccess:
    """One step's expert accesses on a store, layer by layer: the runner's source of routed
    weights (``layer``), and the place where prefetching happens.

    ``experts`` are the step's distinct routed experts when known before the backbone runs
    (pre-gating router; every layer uses them), or None when each layer's gate decides as the
    layer runs (layer-wise router), which rules prefetching out. With ``prefetch`` the first
    routed layer's loads are issued now and each layer's access issues the next routed layer's.
    """

    def __init__(self, store: ExpertStore, step: int, future: FutureUses,
                 experts: Iterable[int] | None, prefetch: bool) -> None:
        if prefetch and experts is None:
            raise ReadmoeError("experts chosen inside each layer (a layer-wise router) are not "
                               "known ahead, so they cannot be prefetched: disable prefetch")
        self.store, self.step, self.future = store, step, future
        self.needed = sorted(set(experts)) if experts is not None else None
        self.prefetch = prefetch and bool(self.needed)
        routed = store.routed_layers
        self._next = dict(zip(routed, routed[1:], strict=False))
        if self.prefetch and routed:
            store.prefetch(routed[0], self.needed, self.time(routed[0]), future)

    def time(self, layer: int) -> int:
        return self.step * self.store.num_layers + layer

    def layer(self, layer: int, experts: Sequence[int]) -> Mapping[int, ExpertWeights]:
        """``layer``'s weights of ``experts`` (the step's experts, with a pre-gating router);
        compute them in the mapping's order."""
        weights = self.store.experts_for(layer, experts, self.time(layer), self.future)
        following = self._next.get(layer)
        if self.prefetch and following is not None:
            weights.after_serial_loads(lambda: self.store.prefetch(
                following, self.needed, self.time(following), self.future))
        return weights


def run_layers(store: ExpertStore, experts: Iterable[int], step: int,
               compute: Callable[[int, Mapping[int, ExpertWeights]], None], future: FutureUses,
               prefetch: bool = True) -> None:
    """Run one step's layers: ``compute(layer, weights)`` for every layer, in order.

    ``experts`` are the distinct routed experts of the step's tokens (every layer uses them, as
    in ReadME); layers without routed experts get an empty dict. With ``prefetch`` the next
    routed layer's loads are issued before this layer computes; without, each layer loads its
    misses when reached (on demand).
    """
    access = StepAccess(store, step, future, experts, prefetch)
    routed = set(store.routed_layers)
    for layer in range(store.num_layers):
        needed = access.needed if layer in routed else None
        compute(layer, access.layer(layer, needed) if needed else {})
