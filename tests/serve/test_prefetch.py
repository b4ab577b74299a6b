"""Prefetch: with an emulated slow link and a fake compute of known length, loading layer l+1
while layer l computes beats on-demand loading, hides load time, and changes no weight."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from readmoe.errors import ReadmoeError
from readmoe.serve.experts import FutureUses
from readmoe.serve.experts.prefetch import AsyncLoader, run_layers
from readmoe.serve.experts.store import ExpertStore
from tests.serve.helpers import saved_tiny_readme

LAYER1_EXPERT_BYTES = 3 * 40 * 64 * 4
BANDWIDTH = LAYER1_EXPERT_BYTES / 0.02  # 20 ms per layer-1 expert, 8 ms per layer-0 expert
COMPUTE_S = 0.04
STEPS = [(0, 1), (2,), (0, 2), (1,), (1, 2), (0,)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return saved_tiny_readme(tmp_path_factory, 5, "prefetch")


def _serve(model, folder, prefetch: bool):
    checked = []

    def compute(layer, weights):
        ref = model.model.layers[layer].mlp.experts
        for e, w in weights.items():
            checked.append(torch.equal(w.gate, ref.gate_proj[e])
                           and torch.equal(w.up, ref.up_proj[e])
                           and torch.equal(w.down, ref.down_proj[e]))
        time.sleep(COMPUTE_S)

    with ExpertStore(folder, capacity=2, policy="belady", tier="ram",
                     bandwidth=BANDWIDTH) as store:
        started = time.perf_counter()
        for step, experts in enumerate(STEPS):
            run_layers(store, experts, step, compute, FutureUses(), prefetch=prefetch)
        return time.perf_counter() - started, store.stats, checked


def test_prefetch_is_faster_hides_loads_and_keeps_weights_exact(saved):
    model, folder = saved
    slow, on_demand, checked_slow = _serve(model, folder, prefetch=False)
    fast, ahead, checked_fast = _serve(model, folder, prefetch=True)
    assert all(checked_slow) and all(checked_fast) and len(checked_fast) == len(checked_slow)
    assert (ahead.hits, ahead.misses) == (on_demand.hits, on_demand.misses)
    assert on_demand.hidden_fraction == pytest.approx(0.0, abs=0.02)
    assert ahead.hidden_fraction > 0.3
    assert fast < slow - 0.5 * (on_demand.stall_s - ahead.stall_s)
    assert fast < slow


def test_a_load_in_flight_is_waited_on_not_repeated():
    calls = []
    gate = threading.Event()

    def copy():
        gate.wait(5)
        calls.append(1)

    loader = AsyncLoader(torch.device("cpu"))
    try:
        first = loader.submit((0, 1), copy, 0)
        second = loader.submit((0, 1), copy, 0)
        assert first is second
        gate.set()
        loader.wait([first, second])
        assert calls == [1]
        loader.submit((0, 1), copy, 0).result()  # done: a new load is a new copy
        assert calls == [1, 1]
    finally:
        loader.close()


def test_urgent_loads_jump_the_queue_and_errors_reach_the_caller():
    order = []
    gate = threading.Event()
    loader = AsyncLoader(torch.device("cpu"))
    try:
        blocker = loader.submit((0, 0), lambda: gate.wait(5), 0)  # occupies the worker
        queued = [loader.submit((1, e), lambda e=e: order.append(e), 0) for e in (1, 2)]
        urgent = loader.submit((0, 3), lambda: order.append(3), 0, urgent=True)
        gate.set()
        loader.wait([blocker, *queued, urgent])
        assert order == [3, 1, 2]

        def broken():
            raise OSError("disk gone")
        with pytest.raises(OSError, match="disk gone"):
            loader.wait([loader.submit((2, 0), broken, 0)])
    finally:
        loader.close()
    with pytest.raises(ReadmoeError, match="closed"):
        loader.submit((3, 0), lambda: None, 0)
