"""The copy engine: loads in issue order, each after the compute it waits for, errors reaching
the waiting compute; the emulated link never makes a copy faster than bytes / bandwidth."""

from __future__ import annotations

import threading
import time

import pytest

from readmoe.errors import ReadmoeError
from readmoe.serve.experts.link import EmulatedLink
from readmoe.serve.experts.loader import ThreadCopyEngine


def test_loads_run_in_order_and_wait_for_their_compute_position():
    order, started_b = [], threading.Event()
    engine = ThreadCopyEngine()
    try:
        a = engine.submit(lambda: order.append("a"), 0)
        b = engine.submit(lambda: (started_b.set(), order.append("b")), 0, after=5)
        c = engine.submit(lambda: order.append("c"), 0)  # behind b: one stream, in order
        engine.wait(a)
        engine.computed(4)
        assert not started_b.wait(0.05) and order == ["a"]
        engine.computed(5)
        engine.wait(c)
        assert order == ["a", "b", "c"]
        assert engine.wait(b) >= 0.0  # done: returns at once
    finally:
        engine.close()


def test_errors_reach_the_waiting_compute_and_a_closed_engine_refuses_work():
    engine = ThreadCopyEngine()

    def broken():
        raise OSError("disk gone")
    ticket = engine.submit(broken, 0)
    with pytest.raises(ReadmoeError, match="disk gone"):
        engine.wait(ticket)
    engine.close()
    with pytest.raises(ReadmoeError, match="closed"):
        engine.submit(lambda: None, 0)


def test_close_finishes_queued_loads_that_can_start():
    done = []
    engine = ThreadCopyEngine()
    for i in range(5):
        engine.submit(lambda i=i: done.append(i), 0)
    engine.close()
    assert done == [0, 1, 2, 3, 4]


def test_the_emulated_link_holds_a_copy_for_at_least_bytes_over_bandwidth():
    link = EmulatedLink(1e6)
    engine = ThreadCopyEngine(link)
    try:
        started = time.perf_counter()
        engine.wait(engine.submit(lambda: None, 10_000))  # 10 ms at 1 MB/s
        assert time.perf_counter() - started >= 0.010
        assert engine.load_s >= 0.010
    finally:
        engine.close()
    assert link.transfer_s(2_000) == pytest.approx(0.002)
    assert "1 GB/s" in EmulatedLink(1e9).describe()
    with pytest.raises(ReadmoeError, match="positive bandwidth"):
        EmulatedLink(0)
