"""The decode step CUDA graphs replay (``graphs.py``), run directly on the CPU: buckets, the
static step against the runner's own (padded rows and contexts, every expert on every row,
layer-wise gates, a dense model), padding that touches only the spare KV slot, and an engine
whose decode steps all take the static path giving HF ``generate``'s tokens."""

from __future__ import annotations

import pytest
import torch

from readmoe.serve.graphs import GraphedDecode, bucket, graphs_apply, length_buckets, row_buckets
from readmoe.serve.kv_cache import PagedKVCache
from readmoe.serve.router_graphs import GraphedRouter
from readmoe.serve.runner import ModelRunner
from readmoe.serve.sampling import SamplingParams
from tests.serve.test_engine import LENGTHS, VOCAB, compensated, engine, prefilled_step, readme


@pytest.fixture(scope="module")
def prompts():
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in LENGTHS]


def test_buckets_cover_every_size_up_to_the_largest():
    assert row_buckets(32) == [1, 2, 4, 8, 16, 24, 32]
    assert row_buckets(3) == [1, 2, 3] and row_buckets(1) == [1]
    assert length_buckets(1000) == [64, 128, 256, 512, 1000] and length_buckets(64) == [64]
    assert [bucket(n, row_buckets(32)) for n in (1, 3, 5, 9, 32)] == [1, 4, 8, 16, 32]


def runner_of(model, fused: bool) -> ModelRunner:
    config = model.config
    kv = PagedKVCache(config.num_hidden_layers, 20, 4, config.num_key_value_heads,
                      config.hidden_size // config.num_attention_heads)
    return ModelRunner(model, kv, fused=fused)


MODELS = {"pregating": lambda: compensated(True), "layerwise": lambda: readme("layerwise"),
          "one-expert": lambda: readme("none", num_experts=1)}


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("kind", sorted(MODELS))
@torch.no_grad()
def test_the_static_step_equals_the_runner_step(prompts, kind, fused):
    model = MODELS[kind]()
    runner = runner_of(model, fused)
    assert not graphs_apply(runner)  # a CPU runner: eager unless told
    seqs = [prompts[1][:12], prompts[2], prompts[3][:7]]  # 3 rows: padded to 4
    if kind == "pregating":
        experts = [model.route(torch.tensor([s]))[0][0].tolist() for s in seqs]
        routed = [ids[-1] for ids in experts]
        assert len(set(routed)) > 1
    else:
        experts, routed = [[0] * len(s) for s in seqs], None if kind == "layerwise" else [0] * 3
    step = prefilled_step(runner, seqs, experts if kind != "layerwise" else None)
    eager = runner.forward(step, routed)
    pools = [t.clone() for t in runner.kv.keys + runner.kv.values]
    runner.graphs = GraphedDecode(runner, max_rows=6, max_len=80, capture=False)
    static = runner.forward(step, routed)
    assert runner.graphs.steps == 1 and static.shape == eager.shape
    torch.testing.assert_close(static, eager, rtol=1e-5, atol=1e-5)
    # the step's own slots are written again (to rounding), padding writes the spare slot only
    written = [int(c.context_slots[-1]) for c in step]
    kept = [s for s in range(runner.kv.spare_slot) if s not in written]
    for before, after in zip(pools, runner.kv.keys + runner.kv.values, strict=True):
        assert torch.equal(before[kept], after[kept])
        torch.testing.assert_close(before[written], after[written], rtol=1e-5, atol=1e-5)
    assert not torch.equal(runner.kv.keys[0][runner.kv.spare_slot], pools[0][-1])


@torch.no_grad()
def test_steps_past_the_largest_bucket_run_eagerly(prompts):
    model = compensated(True)
    runner = runner_of(model, True)
    seqs = [prompts[1][:12], prompts[2], prompts[3][:7]]
    experts = [model.route(torch.tensor([s]))[0][0].tolist() for s in seqs]
    step = prefilled_step(runner, seqs, experts)
    routed = [ids[-1] for ids in experts]
    few = runner.graphs = GraphedDecode(runner, max_rows=2, max_len=80, capture=False)
    runner.forward(step, routed)  # 3 rows
    runner.graphs = GraphedDecode(runner, max_rows=4, max_len=10, capture=False)
    runner.forward(step, routed)  # a 12-token context
    assert few.steps == runner.graphs.steps == 0
    runner.forward(step[1:], routed[1:])  # 9 and 7 tokens
    assert runner.graphs.steps == 1


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_an_engine_on_the_static_step_serves_as_hf_generate(prompts, kind):
    model = MODELS[kind]()
    eng = engine(model, fused_ops=False)  # as on a GPU: the router's step in torch ops
    eng.runner.graphs = GraphedDecode(eng.runner, 3, 56, capture=False)
    if eng.router is not None:  # its router's step on the graphs' fixed shapes too
        eng.router.graphs = GraphedRouter(eng.router, eng.kv.spare_slot, 3, 56, capture=False)
    outs = eng.generate(prompts, SamplingParams(max_tokens=6))
    for p, out in zip(prompts, outs, strict=True):
        ref = model.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False)
        assert out.token_ids == ref[0, len(p):].tolist()
    assert eng.runner.graphs.steps > 0
    assert eng.router is None or eng.router.graphs.steps > 0


@torch.no_grad()
def test_a_failed_capture_warns_and_leaves_every_step_eager(prompts, monkeypatch):
    model = compensated(True)
    runner = runner_of(model, True)
    seqs = [prompts[1][:12], prompts[2]]
    experts = [model.route(torch.tensor([s]))[0][0].tolist() for s in seqs]
    step = prefilled_step(runner, seqs, experts)
    routed = [ids[-1] for ids in experts]
    eager = runner.forward(step, routed)
    runner.graphs = GraphedDecode(runner, max_rows=4, max_len=80)

    def fails(*_):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(runner.graphs, "_captured", fails)
    with pytest.warns(UserWarning, match="stream is capturing.*run eagerly"):
        first = runner.forward(step, routed)  # this step: the static one, uncaptured
    torch.testing.assert_close(first, eager, rtol=1e-5, atol=1e-5)
    assert runner.graphs.failure and not runner.graphs.covers(step)
    torch.testing.assert_close(runner.forward(step, routed), eager, rtol=1e-5, atol=1e-5)
    assert runner.graphs.steps == 1 and runner.graphs.captured == 0


def test_an_engine_with_graphs_graphs_its_routers_step_too(monkeypatch):
    """Where the backbone's decode steps are graphed, the pre-gating router's are, over the
    same buckets, its pools holding the KV cache's spare slot."""
    from readmoe.serve import engine as engine_module

    monkeypatch.setattr(engine_module, "graphs_apply", lambda runner: True)
    eng = engine(compensated(True), fused_ops=False)
    graphs = eng.router.graphs
    assert isinstance(graphs, GraphedRouter) and graphs.capture
    assert graphs.spare == eng.kv.spare_slot < eng.router.keys[0].shape[0]
    assert (graphs.rows, graphs.lengths) == (eng.runner.graphs.rows, eng.runner.graphs.lengths)
