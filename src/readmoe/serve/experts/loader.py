"""Copy engines: where the fast tier's loads run, beside the compute and never in its way.

Why: a prefetch only pays if the copy overlaps compute without slowing it. A load may have to
wait for compute: it overwrites the slot of an expert that must first compute (``Load.after``).
Compute reports progress as a global position count (one position per routed expert computed,
across steps, ``computed``), and each load names the position it waits for.

Order: two classes, each first in first out. ``urgent`` loads are ones a planned step needs;
``background`` loads are prefetches for a step not planned yet (``plan.speculate``). Whenever
the copy stream is free it starts the oldest urgent load that may start, else the oldest
background one, so a prefetch never queues a needed load behind it (it can delay one by at most
the load already running: copies are not preempted). A background load that a later plan needs
is ``promote``d to urgent. A load into a slot that an earlier load is still filling names it
(``follows``) and never starts before it (an urgent load promotes the one it follows), so two
loads into one slot land in issue order.

- ``ThreadCopyEngine`` (CPU): one worker thread. A copy is one ``Tensor.copy_`` per weight,
  which releases the interpreter lock for the whole memcpy, and an emulated link's wait is a
  plain ``time.sleep`` (no busy-wait: spinning in Python holds the lock the compute thread
  needs between its operators). Give it a core of its own (torch threads = cores - 1);
  benchmarks/codesign.py measures how much it slows compute.
- ``CudaCopyEngine``: no thread and no host wait. Loads go on a side stream from pinned host
  memory; a load that waits for compute waits on an event the compute stream records at that
  position, and the compute stream waits on each load's completion event before reading the
  slot. Only the enqueueing is done on the host.

``wait(ticket)`` is what compute calls before it reads a slot; it returns the seconds the host
waited (on CUDA always 0: the wait is the stream's). ``load_s`` sums the time loads took.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable

import torch

from readmoe.errors import ReadmoeError
from readmoe.serve.experts.link import EmulatedLink

Copy = Callable[[], None]


class CopyEngine(ABC):
    """A copy stream: loads by class and age, each after the compute position it waits for."""

    @abstractmethod
    def submit(self, copy: Copy, nbytes: int, after: int | None = None,
               background: bool = False, follows: int | None = None) -> int:
        """Queue ``copy``; it starts once position ``after`` has computed and load ``follows``
        (an earlier one into the same slot) is done. Returns a ticket."""

    @abstractmethod
    def promote(self, ticket: int) -> None:
        """A background load is needed by a planned step: make it urgent (no-op otherwise)."""

    @abstractmethod
    def computed(self, position: int) -> None:
        """Compute has finished every position up to ``position``."""

    @abstractmethod
    def wait(self, ticket: int) -> float:
        """Make the load ``ticket`` visible to compute; return the seconds the host waited."""

    @property
    @abstractmethod
    def load_s(self) -> float:
        """Seconds the copy stream spent on loads so far."""

    @abstractmethod
    def close(self) -> None:
        """Finish the queued loads and release the engine's resources."""


_Item = tuple[int, Copy, int, int | None, int | None]  # ticket, copy, bytes, after, follows


class ThreadCopyEngine(CopyEngine):
    """One background copy thread, optionally behind an emulated link (module docstring)."""

    def __init__(self, link: EmulatedLink | None = None) -> None:
        self.link = link
        self._load_s = 0.0
        self._urgent: deque[_Item] = deque()
        self._background: deque[_Item] = deque()
        self._issued = 0
        self._done: set[int] = set()
        self._progress = -1
        self._error: BaseException | None = None
        self._ready = threading.Condition()
        self._closed = False
        self._worker = threading.Thread(target=self._work, name="expert-copy", daemon=True)
        self._worker.start()

    @property
    def load_s(self) -> float:
        return self._load_s

    def submit(self, copy: Copy, nbytes: int, after: int | None = None,
               background: bool = False, follows: int | None = None) -> int:
        with self._ready:
            if self._closed:
                raise ReadmoeError("the expert copy engine is closed")
            ticket = self._issued
            self._issued += 1
            (self._background if background else self._urgent).append(
                (ticket, copy, nbytes, after, follows))
            if not background and follows is not None:
                self._promote(follows)
            self._ready.notify_all()
            return ticket

    def promote(self, ticket: int) -> None:
        with self._ready:
            self._promote(ticket)
            self._ready.notify_all()

    def _promote(self, ticket: int) -> None:
        for item in self._background:
            if item[0] == ticket:
                self._background.remove(item)
                self._urgent = deque(sorted([*self._urgent, item], key=lambda i: i[0]))
                if item[4] is not None:
                    self._promote(item[4])
                return

    def computed(self, position: int) -> None:
        """Called once per routed expert computed, so it wakes the worker only when the head of
        a queue was waiting for a position this one reaches: every other wake-up would only make
        the worker take the interpreter lock from compute, check, and sleep again."""
        with self._ready:
            if position <= self._progress:
                return
            previous, self._progress = self._progress, position
            if any(queue and queue[0][3] is not None and previous < queue[0][3] <= position
                   for queue in (self._urgent, self._background)):
                self._ready.notify_all()

    def wait(self, ticket: int) -> float:
        started = time.perf_counter()
        with self._ready:
            while ticket not in self._done and self._error is None:
                self._ready.wait()
            if self._error is not None:
                raise ReadmoeError(f"an expert load failed: {self._error}") from self._error
        return time.perf_counter() - started

    def _next(self) -> deque[_Item] | None:
        """The queue whose head starts next (urgent first), or None if neither may start."""
        for queue in (self._urgent, self._background):
            if queue:
                _, _, _, after, follows = queue[0]
                if ((after is None or after <= self._progress)
                        and (follows is None or follows in self._done)):
                    return queue
        return None

    def _work(self) -> None:
        while True:
            with self._ready:
                while not self._closed and self._next() is None:
                    self._ready.wait()
                queue = self._next()
                if queue is None:
                    return  # closed, and nothing left that may start
                ticket, copy, nbytes, _, _ = queue.popleft()
            started = time.perf_counter()
            try:
                copy()
                if self.link is not None:
                    self.link.hold(started, nbytes)
            except BaseException as exc:  # the waiting compute re-raises it
                with self._ready:
                    self._error = exc
                    self._ready.notify_all()
                return
            with self._ready:
                self._load_s += time.perf_counter() - started
                self._done.add(ticket)
                self._ready.notify_all()

    def close(self) -> None:
        with self._ready:
            self._closed = True
            self._ready.notify_all()
        self._worker.join()


class CudaCopyEngine(CopyEngine):
    """Loads on side streams, ordered by events, with no host waits (module docstring): urgent
    and background loads on two streams, so the hardware copy engines run them side by side and
    a prefetch never blocks a needed load behind it."""

    def __init__(self, device: torch.device) -> None:
        self._streams = (torch.cuda.Stream(device), torch.cuda.Stream(device))
        self._device = device
        self._waiting: tuple[deque, deque] = (deque(), deque())
        self._done: dict[int, tuple[torch.cuda.Event, torch.cuda.Event]] = {}
        self._enqueued: set[int] = set()
        self._issued = 0
        self._progress = -1
        self._timed = 0.0

    @property
    def load_s(self) -> float:
        for ticket, (start, end) in list(self._done.items()):
            if end.query():
                self._timed += start.elapsed_time(end) / 1e3
                del self._done[ticket]
        return self._timed

    def submit(self, copy: Copy, nbytes: int, after: int | None = None,
               background: bool = False, follows: int | None = None) -> int:
        ticket = self._issued
        self._issued += 1
        self._waiting[int(background)].append((ticket, copy, after, follows))
        self._flush()
        return ticket

    def promote(self, ticket: int) -> None:
        """Background loads already run on their own stream; nothing to reorder."""

    def computed(self, position: int) -> None:
        if position > self._progress:
            self._progress = position
            self._flush()

    def wait(self, ticket: int) -> float:
        if any(item[0] == ticket for queue in self._waiting for item in queue):
            raise ReadmoeError(f"load {ticket} waits for compute that has not run: the step "
                               "plan computes an expert before the load it needs")
        events = self._done.get(ticket)
        if events is not None:  # else already finished and accounted
            torch.cuda.current_stream(self._device).wait_event(events[1])
        return 0.0

    def _flush(self) -> None:
        """Enqueue, in order per class, the loads whose compute position has been reached,
        each after all compute queued so far (a slot may still be read by earlier kernels)."""
        compute, moved = None, True
        while moved:  # a load may follow one just enqueued on the other stream
            moved = False
            for stream, waiting in zip(self._streams, self._waiting, strict=True):
                while waiting:
                    ticket, copy, after, follows = waiting[0]
                    if after is not None and after > self._progress:
                        break
                    if follows is not None and follows not in self._enqueued:
                        break
                    if compute is None:
                        compute = torch.cuda.Event()
                        compute.record(torch.cuda.current_stream(self._device))
                    stream.wait_event(compute)
                    if follows is not None and follows in self._done:
                        stream.wait_event(self._done[follows][1])
                    waiting.popleft()
                    self._enqueue(stream, ticket, copy)
                    moved = True

    def _enqueue(self, stream: torch.cuda.Stream, ticket: int, copy: Copy) -> None:
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            start.record(stream)
            copy()
            end.record(stream)
        self._done[ticket] = (start, end)
        self._enqueued.add(ticket)

    def close(self) -> None:
        for stream in self._streams:
            stream.synchronize()
