"""How much of the machine a timing had: the CPU time the hypervisor stole during each timed run,
and the memory read rate sampled just before it.

Why: the machine these benchmarks run on is shared, and a neighbour takes both. Measured on
the 2-core AMD EPYC, 2026-12-06, 09:05-09:40: an FMA loop at full speed (95-101 GFLOP/s, as
quiet) while a 32-row panel product ran at 47-53 GFLOP/s against 89 quiet, and the engine's
batch-32 decode at 60% of its quiet rate; over the day about 2.5% of the CPU time was stolen,
in bursts. A row timed then is not comparable with one timed quiet, and a ratio of two peers
timed minutes apart is only as good as the quieter of them. So each row keeps the share of
its timed runs' CPU time stolen (``/proc/stat``: exact, over the whole run) and a 256 MiB read
timed before each run (a sample: a burst between two samples goes unseen); a row is contended
when more than ``MAX_STOLEN`` was stolen or its slowest read fell below ``QUIET`` of the best
seen at its thread count, and ``quietest`` times such a row again, the same way for every
peer, keeping the quietest try (never the fastest timing).
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch

from readmoe.serve import cpu_ops

QUIET = 0.85  # a row whose slowest read is below this share of the best read is contended
MAX_STOLEN = 0.02  # ... or whose timed runs lost more than this share of their CPU time
PROBE_MIB = 256  # 8x this machine's last-level cache
PROBE_STREAMS = 4  # neighbouring streams a thread (read_streams), as the panel products read
PROC_STAT = Path("/proc/stat")

T = TypeVar("T")


@dataclass
class Quietness:
    """What one row's timed runs had of the machine."""

    reads: list[float] = field(default_factory=list)  # GB/s, one before each timed run
    stolen: float = 0.0  # CPU seconds stolen from the process's threads during the runs
    busy: float = 0.0  # CPU seconds the runs' threads had (wall time x threads)
    tries: int = 1

    @property
    def stolen_share(self) -> float:
        return self.stolen / self.busy if self.busy > 0 else 0.0

    def read_share(self, best_read: float) -> float:
        """The slowest read over ``best_read`` (1 with no read to go by)."""
        return min(self.reads) / best_read if self.reads and best_read > 0 else 1.0

    def share_of(self, best_read: float) -> float:
        """The slowest read over ``best_read``, less the share of CPU time stolen."""
        return self.read_share(best_read) * (1.0 - self.stolen_share)

    def contended(self, best_read: float) -> bool:
        return contended(self.read_share(best_read), self.stolen_share)


def contended(read_share: float, stolen_share: float) -> bool:
    """Whether a row whose slowest read was ``read_share`` of the best, and which lost
    ``stolen_share`` of its CPU time, was timed on a contended machine."""
    return read_share < QUIET or stolen_share > MAX_STOLEN


def stolen_seconds() -> float:
    """CPU seconds the hypervisor has stolen from this machine's CPUs since boot (0 where the
    kernel does not say)."""
    try:
        fields = PROC_STAT.read_text().split("\n", 1)[0].split()
    except OSError:
        return 0.0
    return int(fields[8]) / os.sysconf("SC_CLK_TCK") if len(fields) > 8 else 0.0


class ReadProbe:
    """Read rates and stolen time of the timed runs it wraps, at the current thread count."""

    def __init__(self, device: torch.device) -> None:
        self.x = torch.ones(PROBE_MIB * 1024 * 1024 // 4, device=device)
        ops = cpu_ops.load() if device.type == "cpu" else None
        self.read = (functools.partial(ops.read_streams, self.x, PROBE_STREAMS)
                     if ops is not None else self.x.sum)
        self.now = Quietness()
        self.best: dict[int, float] = {}  # thread count -> best read seen

    def sample(self) -> float:
        """The faster of two reads now, kept with the current row."""
        seconds = min(timed(self.read) for _ in range(2))
        gbs = self.x.numel() * self.x.element_size() / seconds / 1e9
        self.now.reads.append(gbs)
        threads = torch.get_num_threads()
        self.best[threads] = max(gbs, self.best.get(threads, 0.0))
        return gbs

    def before(self, run: Callable[..., T]) -> Callable[..., T]:
        """``run`` with a read sampled before each call and the CPU time stolen during it."""

        def probed(*args, **kwargs) -> T:
            self.sample()
            stolen, start = stolen_seconds(), time.perf_counter()
            try:
                return run(*args, **kwargs)
            finally:
                self.now.busy += (time.perf_counter() - start) * torch.get_num_threads()
                self.now.stolen += stolen_seconds() - stolen

        return probed

    def take(self) -> Quietness:
        """What the runs since the last take had."""
        out, self.now = self.now, Quietness()
        return out


def quietest(measure: Callable[[], T], probe: ReadProbe, best_read: Callable[[], float],
             retries: int) -> tuple[T, Quietness]:
    """(result, quietness) of ``measure`` (whose timed runs go through ``probe.before``),
    timed again up to ``retries`` times while contended against ``best_read()`` (the best
    read known at this thread count); the try kept is the quietest (``Quietness.share_of``)."""
    tries: list[tuple[T, Quietness]] = []
    for _ in range(retries + 1):
        probe.take()
        result = measure()
        quiet = probe.take()
        tries.append((result, quiet))
        if not quiet.contended(best_read()):
            break
    result, quiet = max(tries, key=lambda t: t[1].share_of(best_read()))
    quiet.tries = len(tries)
    return result, quiet


def timed(fn: Callable[[], object]) -> float:
    """Seconds ``fn`` takes, the device synchronised before and after."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter() - start
