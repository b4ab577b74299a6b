"""An emulated host-to-accelerator link: a copy of ``n`` bytes takes at least ``n / bandwidth``.

Why: on a CPU-only machine the "slow tier" and the "fast tier" are the same RAM, so a copy is
nearly free and prefetching would have nothing to hide. Holding each copy until its link time
has passed lets the CPU model a PCIe-bound accelerator honestly; results from it are labelled
emulated.

How the wait is done: ``time.sleep`` until the deadline. Sleeping releases the interpreter lock,
so the caller's compute really overlaps the copy, as a DMA engine would; a busy-wait would hold
that lock between the compute thread's operators and slow it. ``sleep`` overshoots by tens of
microseconds, which the copy engine's measured ``load_s`` includes. The real copy's time
counts toward the link time: the link never makes a copy faster than it is, and a copy slower
than the link is not padded.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from readmoe.errors import ReadmoeError


@dataclass(frozen=True)
class EmulatedLink:
    bandwidth: float  # bytes per second

    def __post_init__(self) -> None:
        if not self.bandwidth > 0:
            raise ReadmoeError(f"an emulated link needs a positive bandwidth, got {self.bandwidth}")

    def transfer_s(self, nbytes: int) -> float:
        return nbytes / self.bandwidth

    def hold(self, started: float, nbytes: int) -> None:
        """Return once ``transfer_s(nbytes)`` has passed since ``started`` (perf_counter)."""
        remaining = started + self.transfer_s(nbytes) - time.perf_counter()
        if remaining > 0:
            time.sleep(remaining)

    def describe(self) -> str:
        return f"emulated link {self.bandwidth / 1e9:g} GB/s"
