"""ExpertStore: bitwise-correct weights from every tier, bounded residency, stats that add up,
emulated link timing, and hit ratios equal to the simulator's ExpertCache."""

from __future__ import annotations

import random
import time

import pytest
import torch

from readmoe.errors import ReadmoeError
from readmoe.serve.experts import ExpertCache, FutureUses, make_policy
from readmoe.serve.experts.link import EmulatedLink
from readmoe.serve.experts.store import ExpertStore
from tests.model.test_modeling_readme import NUM_EXPERTS
from tests.serve.helpers import saved_tiny_readme

ROUTED = (0, 1)  # the tiny model's layer 2 has no routed experts


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return saved_tiny_readme(tmp_path_factory, 3, "store")


def _sources(saved):
    model, folder = saved
    return [(folder, "file"), (folder, "ram"), (model.state_dict(), "ram")]


def _accesses(seed: int, count: int, capacity: int) -> list[tuple[int, ...]]:
    rng = random.Random(seed)
    return [tuple(sorted(rng.sample(range(NUM_EXPERTS), rng.randint(1, capacity))))
            for _ in range(count)]


@pytest.mark.parametrize("index", range(3))
def test_every_tier_returns_the_models_weights_bitwise(saved, index):
    model, _ = saved
    source, tier = _sources(saved)[index]
    with ExpertStore(source, capacity=2, policy="lru", tier=tier) as store:
        assert store.routed_layers == list(ROUTED) and store.num_layers == 3
        for step, experts in enumerate(_accesses(0, 12, NUM_EXPERTS)):
            for layer in ROUTED:  # over capacity too: computed in the mapping's order
                got = store.experts_for(layer, experts, step * 3 + layer, FutureUses())
                ref = model.model.layers[layer].mlp.experts
                assert sorted(got) == list(experts)
                for e in got:
                    assert torch.equal(got[e].gate, ref.gate_proj[e])
                    assert torch.equal(got[e].up, ref.up_proj[e])
                    assert torch.equal(got[e].down, ref.down_proj[e])
                assert len(store.cache.resident(layer)) <= 2


@pytest.mark.parametrize("policy", ["random", "lru", "lfu", "belady"])
def test_stats_add_up_and_match_the_simulators_cache(saved, policy):
    _, folder = saved
    accesses = _accesses(1, 40, 3)  # some need more experts than the 2 slots
    uses = {}
    for step, experts in enumerate(accesses):
        for layer in ROUTED:
            for e in experts:
                uses.setdefault((layer, e), []).append(step * 3 + layer)
    future = FutureUses(uses)  # the whole future known: Belady's best case
    with ExpertStore(folder, capacity=2, policy=policy, tier="file") as store:
        cache = ExpertCache(2, store.expert_bytes, make_policy(policy))
        for step, experts in enumerate(accesses):
            for layer in ROUTED:
                for _ in store.experts_for(layer, experts, step * 3 + layer, future).values():
                    pass
                cache.access([(layer, e) for e in experts], step * 3 + layer, future)
                assert store.cache.resident(layer) == cache.resident(layer)
        stats = store.stats
    assert stats.hits == cache.stats.hits and stats.misses == cache.stats.misses
    assert stats.hits + stats.misses == sum(len(a) for a in accesses) * len(ROUTED)
    assert stats.bytes_moved == cache.stats.bytes_moved
    assert stats.bytes_moved <= stats.misses * max(store.expert_bytes)
    assert stats.bytes_moved >= stats.misses * min(store.expert_bytes[layer] for layer in ROUTED)
    assert stats.evictions > 0 and stats.hidden_fraction == 0.0  # on demand: nothing hidden


def test_bytes_per_miss_equal_one_expert(saved):
    _, folder = saved
    with ExpertStore(folder, capacity=1, policy="lru") as store:
        store.experts_for(1, [0], 1, FutureUses())
        store.experts_for(1, [2], 4, FutureUses())
        # layer 1: gate, up [R=40, H=64] and down [64, 40], fp32
        assert store.expert_bytes[1] == 3 * 40 * 64 * 4
        assert store.stats.bytes_moved == 2 * store.expert_bytes[1]
        assert store.stats.misses == 2 and store.stats.evictions == 1


def test_emulated_link_holds_each_copy_for_bytes_over_bandwidth(saved):
    _, folder = saved
    bandwidth = 3 * 40 * 64 * 4 / 0.02  # 20 ms per expert of layer 1 (R=40, H=64, fp32)
    with ExpertStore(folder, capacity=3, policy="lru", tier="ram", bandwidth=bandwidth) as store:
        started = time.perf_counter()
        store.experts_for(1, [0, 1, 2], 1, FutureUses())
        elapsed = time.perf_counter() - started
        assert "emulated" in store.describe()
        assert 0.06 <= elapsed < 0.06 + 0.05  # three copies, one link, generous upper slack
        assert store.stats.load_s == pytest.approx(0.06, abs=0.03)
        assert store.stats.stall_s == pytest.approx(elapsed, abs=0.01)


def test_link_hold_precision():
    link = EmulatedLink(1e6)
    started = time.perf_counter()
    link.hold(started, 10_000)  # 10 ms
    assert 0.010 <= time.perf_counter() - started < 0.030


def test_bad_uses_are_refused(saved):
    model, folder = saved
    with pytest.raises(ReadmoeError, match="tier"):
        ExpertStore(folder, capacity=2, tier="disk")
    with pytest.raises(ReadmoeError, match="model folder"):
        ExpertStore(model.state_dict(), capacity=2, tier="file")
    with ExpertStore(folder, capacity=2) as store:
        with pytest.raises(ReadmoeError, match="no routed"):
            store.experts_for(2, [0], 2, FutureUses())
        store.prefetch(0, [0], 0, FutureUses())
        with pytest.raises(ReadmoeError, match="prefetched"):
            store.experts_for(0, [1], 0, FutureUses())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_copies_are_bitwise(saved):
    model, folder = saved
    for tier in ("file", "ram"):
        with ExpertStore(folder, capacity=2, tier=tier, device="cuda") as store:
            store.prefetch(0, [1, 2], 0, FutureUses())
            got = store.experts_for(0, [1, 2], 0, FutureUses())
            for e in (1, 2):
                ref = model.model.layers[0].mlp.experts.down_proj[e]
                assert torch.equal(got[e].down.cpu(), ref)


def test_next_layer_prefetch_waits_for_this_layers_serial_loads(saved):
    _, folder = saved
    with ExpertStore(folder, capacity=1, policy="lru") as store:
        weights = store.experts_for(0, [0, 1], 0, FutureUses())  # 1 must evict 0: serial
        called = []
        weights.after_serial_loads(lambda: called.append("prefetch"))
        assert list(weights) == [0, 1] and not called
        weights[0]
        assert not called
        weights[1]
        assert called == ["prefetch"]
        within = store.experts_for(1, [2], 1, FutureUses())
        within.after_serial_loads(lambda: called.append("at once"))
        assert called == ["prefetch", "at once"]
