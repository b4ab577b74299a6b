"""PagedRouter: one batched router step over pooled keys equals each request's own cached
route() call, with the fused CPU ops and with torch ops."""

from __future__ import annotations

import pytest
import torch

from readmoe.model import RouterCache
from readmoe.serve import cpu_ops
from readmoe.serve.router_step import PagedRouter
from tests.serve.test_engine import VOCAB, readme

BLOCK = 8


def ops_variants() -> list:
    built = cpu_ops.load()
    return [None] if built is None else [None, built]


@pytest.mark.parametrize("margin", [0.0, 0.7])
@pytest.mark.parametrize("fused", [False, True])
def test_batched_step_equals_per_request_routing(margin, fused):
    ops = cpu_ops.load() if fused else None
    if fused and ops is None:
        pytest.skip("the fused CPU ops could not be built here")
    model = readme()
    model.config.router_hysteresis = margin
    paged = PagedRouter(model, 64 * BLOCK, ops)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (3, 11, 1, 7)]
    # scattered, non-contiguous blocks per request, as the allocator hands them out
    blocks = torch.randperm(64, generator=gen).view(len(prompts), -1)  # [R, 16]
    slots = [(b[:, None] * BLOCK + torch.arange(BLOCK)).reshape(-1) for b in blocks]
    caches = [RouterCache() for _ in prompts]
    previous = []
    with torch.inference_mode():
        for prompt, cache, own in zip(prompts, caches, slots, strict=True):
            routed = paged.route_prompt(prompt, own[:len(prompt)])
            assert routed == model.route(torch.tensor([prompt]), cache)[0][0].tolist()
            previous.append(routed[-1])
        lengths = [len(p) for p in prompts]
        for _ in range(6):  # several steps: the pools keep growing in step with the caches
            tokens = torch.randint(3, VOCAB, (len(prompts),), generator=gen).tolist()
            lengths = [n + 1 for n in lengths]
            batched = paged.step(tokens, [s[:n] for s, n in zip(slots, lengths, strict=True)],
                                 previous)
            single = [int(model.route(torch.tensor([[t]]), cache)[0][0, 0])
                      for t, cache in zip(tokens, caches, strict=True)]
            assert batched == single
            previous = batched
        for cache, own, n in zip(caches, slots, lengths, strict=True):
            assert cache.length == n
            for layer, (keys, values) in enumerate(zip(cache.keys, cache.values, strict=True)):
                torch.testing.assert_close(paged.keys[layer][own[:n]], keys[0].transpose(0, 1),
                                           atol=1e-6, rtol=0)
                torch.testing.assert_close(paged.values[layer][own[:n]],
                                           values[0].transpose(0, 1), atol=1e-6, rtol=0)
    assert paged.step([], [], []) == []


def test_logits_follow_the_cache_not_the_pool_neighbours():
    """A request attends to its own slots only: garbage elsewhere in the pools changes
    nothing (lengths bound the padded slot rows)."""
    model = readme()
    for ops in ops_variants():
        paged = PagedRouter(model, 16 * BLOCK, ops)
        prompt = [5, 9, 17, 33]
        own = torch.arange(BLOCK, 2 * BLOCK)
        with torch.inference_mode():
            paged.route_prompt(prompt, own[:4])
            clean = paged.step([40], [own[:5]], [-1])
            for pool in (*paged.keys, *paged.values):
                pool[:BLOCK].normal_()
                pool[2 * BLOCK:].normal_()
            paged.route_prompt(prompt, own[:4])
            assert paged.step([40], [own[:5]], [-1]) == clean


def test_refuses_a_model_without_the_pregating_router_and_mismatched_slots():
    with pytest.raises(ValueError, match="pre-gating"):
        PagedRouter(readme("layerwise"), 64)
    paged = PagedRouter(readme(), 64)
    with pytest.raises(ValueError, match="2 slots for a prompt of 3"):
        paged.route_prompt([1, 2, 3], torch.arange(2))


@pytest.mark.parametrize("margin", [0.0, 0.7])
def test_the_graphed_step_equals_the_eager_step(margin):
    """The fixed-shape step CUDA graphs replay (``router_graphs``), run directly: 3 rows
    padded to 4 and contexts padded to a length bucket give the eager step's experts and
    keys, and padding writes the spare slot alone."""
    from readmoe.serve.router_graphs import GraphedRouter

    model = readme()
    model.config.router_hysteresis = margin
    spare = 16 * BLOCK
    eager, graphed = PagedRouter(model, spare + 1), PagedRouter(model, spare + 1)
    graphed.graphs = GraphedRouter(graphed, spare, max_rows=6, max_len=80, capture=False)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (3, 11, 6)]
    slots = [torch.randperm(spare, generator=gen)[:40] for _ in prompts]  # scattered
    with torch.inference_mode():
        previous = [[paged.route_prompt(p, own[:len(p)])[-1] for p, own in
                     zip(prompts, slots, strict=True)] for paged in (eager, graphed)][0]
        lengths = [len(p) for p in prompts]
        for _ in range(4):
            tokens = torch.randint(3, VOCAB, (len(prompts),), generator=gen).tolist()
            lengths = [n + 1 for n in lengths]
            contexts = [s[:n] for s, n in zip(slots, lengths, strict=True)]
            want = eager.step(tokens, contexts, previous)
            assert graphed.step(tokens, contexts, previous) == want
            previous = want
    assert graphed.graphs.steps == 4
    owned = torch.cat(slots)
    for before, after in zip(eager.keys + eager.values, graphed.keys + graphed.values,
                             strict=True):
        torch.testing.assert_close(after[owned], before[owned], atol=1e-6, rtol=0)
        unowned = torch.ones(spare, dtype=torch.bool)
        unowned[owned] = False
        assert not after[:spare][unowned].any()  # nothing written outside the requests
        assert after[spare].any()  # padding wrote the spare slot


def test_steps_past_the_graphs_buckets_run_eagerly():
    from readmoe.serve.router_graphs import GraphedRouter

    model = readme()
    paged = PagedRouter(model, 8 * BLOCK + 1)
    paged.graphs = GraphedRouter(paged, 8 * BLOCK, max_rows=2, max_len=64, capture=False)
    own = [torch.arange(BLOCK), torch.arange(BLOCK, 2 * BLOCK), torch.arange(2 * BLOCK, 24)]
    with torch.inference_mode():
        paged.step([4, 5, 6], [s[:2] for s in own], [-1, -1, -1])  # 3 rows > 2
        assert paged.graphs.steps == 0
        paged.step([4, 5], [s[:3] for s in own[:2]], [-1, -1])
        assert paged.graphs.steps == 1
    with pytest.raises(ValueError, match="spare slot"):
        GraphedRouter(paged, 8 * BLOCK + 1, max_rows=2, max_len=64)


def test_a_failed_router_capture_warns_and_leaves_every_step_eager(monkeypatch):
    from readmoe.serve.router_graphs import GraphedRouter

    model = readme()
    eager, graphed = PagedRouter(model, 8 * BLOCK + 1), PagedRouter(model, 8 * BLOCK + 1)
    graphed.graphs = GraphedRouter(graphed, 8 * BLOCK, max_rows=4, max_len=64)

    def fails(*_):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(graphed.graphs, "_captured", fails)
    own = [torch.arange(BLOCK), torch.arange(BLOCK, 2 * BLOCK)]
    with torch.inference_mode():
        want = eager.step([4, 5], [s[:3] for s in own], [-1, -1])
        with pytest.warns(UserWarning, match="stream is capturing.*router steps run eagerly"):
            assert graphed.step([4, 5], [s[:3] for s in own], [-1, -1]) == want
        assert graphed.graphs.failure and not graphed.graphs.fits([s[:4] for s in own])
        assert (graphed.step([6, 7], [s[:4] for s in own], want)
                == eager.step([6, 7], [s[:4] for s in own], want))
    assert graphed.graphs.steps == 1 and graphed.graphs.captured == 0
