"""benchmarks/contention.py: a row timed while a neighbour holds the machine's memory or cores
is timed again, and the quietest try is kept, never the fastest."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
import contention  # noqa: E402
from contention import MAX_STOLEN, QUIET, Quietness, ReadProbe, quietest  # noqa: E402


class ScriptedProbe:
    """A probe whose tries had the reads and stolen shares of a script."""

    def __init__(self, tries: list[tuple[list[float], float]]) -> None:
        self.tries = iter(tries)
        self.now = Quietness()

    def run(self, result):
        reads, stolen = next(self.tries)
        self.now = Quietness(reads=reads, stolen=stolen, busy=1.0)
        return result

    def take(self) -> Quietness:
        out, self.now = self.now, Quietness()
        return out


def test_a_quiet_row_is_timed_once():
    probe = ScriptedProbe([([30.0, 29.0], 0.0), ([10.0], 0.0)])
    result, quiet = quietest(lambda: probe.run(1.0), probe, lambda: 30.0, retries=2)
    assert result == 1.0 and quiet.reads == [30.0, 29.0] and quiet.tries == 1


def test_a_contended_row_keeps_its_quietest_try_not_its_fastest():
    probe = ScriptedProbe([([30.0, 12.0], 0.0), ([20.0, 22.0], 0.0), ([30.0, 30.0], 0.5)])
    times = iter([0.5, 2.0, 0.1])
    result, quiet = quietest(lambda: probe.run(next(times)), probe, lambda: 30.0, retries=2)
    assert quiet.tries == 3 and quiet.reads == [20.0, 22.0] and result == 2.0


def test_stolen_cpu_time_makes_a_row_contended():
    best = 30.0
    assert not Quietness(reads=[best], stolen=MAX_STOLEN, busy=1.0).contended(best)
    assert Quietness(reads=[best], stolen=2 * MAX_STOLEN, busy=1.0).contended(best)
    assert Quietness(reads=[QUIET * best * 0.99], stolen=0.0, busy=1.0).contended(best)


def test_retries_stop_once_a_try_is_quiet():
    quiet_read = QUIET * 30.0
    probe = ScriptedProbe([([quiet_read - 1], 0.0), ([quiet_read], 0.0), ([30.0], 0.0)])
    calls = iter(range(1, 10))
    result, quiet = quietest(lambda: probe.run(next(calls)), probe, lambda: 30.0, retries=5)
    assert result == 2 and quiet.reads == [quiet_read] and quiet.tries == 2


def test_the_probe_samples_before_each_call_and_counts_what_was_stolen(monkeypatch):
    stolen = iter([1.0, 1.25, 2.0, 2.0])
    monkeypatch.setattr(contention, "stolen_seconds", lambda: next(stolen))
    probe = ReadProbe(torch.device("cpu"))
    calls = []
    wrapped = probe.before(lambda x: calls.append(len(probe.now.reads)) or x * 2)
    assert wrapped(3) == 6 and wrapped(4) == 8
    assert calls == [1, 2]  # each call ran after its own read
    quiet = probe.take()
    assert len(quiet.reads) == 2 and all(r > 0 for r in quiet.reads) and quiet.stolen == 0.25
    assert quiet.busy > 0 and probe.take().reads == []
    assert probe.best[torch.get_num_threads()] == max(quiet.reads)


def test_stolen_seconds_reads_the_kernels_counter(tmp_path, monkeypatch):
    stat = tmp_path / "stat"
    stat.write_text("cpu  10 0 5 100 0 0 0 250 0 0\ncpu0 5 0 2 50 0 0 0 125 0 0\n")
    monkeypatch.setattr(contention, "PROC_STAT", stat)
    assert contention.stolen_seconds() == 250 / contention.os.sysconf("SC_CLK_TCK")
    monkeypatch.setattr(contention, "PROC_STAT", tmp_path / "missing")
    assert contention.stolen_seconds() == 0.0
