"""benchmarks/contention.py: a row timed while the machine's memory is contended is timed again,
and the quietest try is kept, never the fastest."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
from contention import QUIET, ReadProbe, quietest  # noqa: E402


class ScriptedProbe:
    """A probe whose reads come from a script, one list of samples per try."""

    def __init__(self, tries: list[list[float]]) -> None:
        self.tries = iter(tries)
        self.samples: list[float] = []

    def measure(self, seconds: float):
        def run() -> float:
            self.samples += next(self.tries)
            return seconds
        return run

    def take(self) -> list[float]:
        out, self.samples = self.samples, []
        return out

    def sample(self) -> float:
        raise AssertionError("every try sampled its own reads")


def test_a_quiet_row_is_timed_once():
    probe = ScriptedProbe([[30.0, 29.0], [10.0]])
    result, samples, tries = quietest(probe.measure(1.0), probe, lambda: 30.0, retries=2)
    assert (result, samples, tries) == (1.0, [30.0, 29.0], 1)


def test_a_contended_row_keeps_its_quietest_try_not_its_fastest():
    probe = ScriptedProbe([[30.0, 12.0], [20.0, 22.0], [15.0, 30.0]])
    times = iter([0.5, 2.0, 0.1])

    def measure() -> float:
        probe.samples += next(probe.tries)
        return next(times)

    result, samples, tries = quietest(measure, probe, lambda: 30.0, retries=2)
    assert tries == 3 and samples == [20.0, 22.0] and result == 2.0


def test_retries_stop_once_a_try_is_quiet():
    quiet = QUIET * 30.0
    probe = ScriptedProbe([[quiet - 1], [quiet], [30.0]])
    calls = []

    def measure() -> int:
        probe.samples += next(probe.tries)
        calls.append(1)
        return len(calls)

    result, samples, tries = quietest(measure, probe, lambda: 30.0, retries=5)
    assert (result, samples, tries) == (2, [quiet], 2)


def test_the_read_probe_samples_before_each_call_and_tracks_the_best():
    probe = ReadProbe(torch.device("cpu"))
    calls = []
    wrapped = probe.before(lambda x: calls.append(len(probe.samples)) or x * 2)
    assert wrapped(3) == 6 and wrapped(4) == 8
    assert calls == [1, 2]  # each call ran after its own sample
    samples = probe.take()
    assert len(samples) == 2 and all(s > 0 for s in samples) and probe.take() == []
    assert probe.best[torch.get_num_threads()] == max(samples)
