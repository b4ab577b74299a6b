"""The engine on tiny ReadME models: exact logits, HF-equal greedy output under every
scheduler, one finish per request, no leaked KV blocks, seeded sampling, stop strings,
streaming, and the prune-like (one expert) and layer-wise models."""

from __future__ import annotations

import pytest
import torch

from readmoe.errors import ReadmoeError
from readmoe.serve import cpu_ops
from readmoe.serve.engine import Engine
from readmoe.serve.kv_cache import PagedKVCache
from readmoe.serve.packed import prepack_applies
from readmoe.serve.runner import ModelRunner, RunnerChunk
from readmoe.serve.sampling import SamplingParams
from readmoe.serve.schedulers import SCHEDULERS
from readmoe.serve.types import Budget
from readmoe.serve.workload import Prompt, RequestSpec
from tests.conftest import char_tokenizer
from tests.model.test_modeling_readme import tiny_readme

VOCAB = 128
LENGTHS = (5, 17, 9, 30)


def readme(router: str = "pregating", **overrides):
    model = tiny_readme(0, vocab_size=VOCAB, **overrides)
    if router != "none":
        model.attach_router(router, seed=0)
    return model


@pytest.fixture(scope="module")
def model():
    return readme()


@pytest.fixture(scope="module")
def prompts():
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in LENGTHS]


@pytest.fixture(scope="module")
def hf_outputs(model, prompts):
    return [model.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False)[0, len(p):]
            .tolist() for p in prompts]


def engine(model, scheduler: str = "fcfs", **kwargs) -> Engine:
    fields = dict(budget=Budget(max_tokens=8, max_seqs=3), kv_blocks=14, block_size=4)
    fields.update(kwargs)
    return Engine(model, char_tokenizer(), scheduler, **fields)


@pytest.mark.parametrize(("fused", "prepack"), [(True, True), (True, False), (False, True),
                                               (False, False)])
@torch.no_grad()
def test_runner_logits_equal_the_model_for_mixed_batches(model, prompts, fused, prepack):
    config = model.config
    kv = PagedKVCache(config.num_hidden_layers, 20, 4, config.num_key_value_heads,
                      config.hidden_size // config.num_attention_heads)
    runner = ModelRunner(model, kv, fused=fused, prepack=prepack)
    assert (runner.ops is not None) == (fused and cpu_ops.load() is not None)
    seqs = [torch.tensor(p) for p in prompts[1:3]]  # 17 and 9 tokens
    experts = [model.route(s[None])[0][0] for s in seqs]
    refs = [model(s[None], expert_ids=e[None]).logits[0]
            for s, e in zip(seqs, experts, strict=True)]
    # (request, start, end) per step: chunked prefill, then prefill mixed with decode tokens
    plan = [[(0, 0, 6), (1, 0, 3)], [(0, 6, 16), (1, 3, 8)], [(0, 16, 17), (1, 8, 9)]]
    for step, logits in zip(plan, run_plan(runner, seqs, experts, plan), strict=True):
        for row, (rid, _, end) in enumerate(step):
            torch.testing.assert_close(logits[row], refs[rid][end - 1], atol=1e-4, rtol=0)


def run_plan(runner: ModelRunner, seqs: list[torch.Tensor], experts: list[torch.Tensor],
             plan: list[list[tuple[int, int, int]]]) -> list[torch.Tensor]:
    """Each step's logits: the step's (request, start, end) chunks through ``runner``, the
    requests admitted to its KV cache first."""
    for rid, s in enumerate(seqs):
        runner.kv.admit(str(rid), len(s))
    steps = []
    for step in plan:
        chunks, ids = [], []
        for rid, start, end in step:
            runner.kv.grow(str(rid), end)
            chunks.append(RunnerChunk(seqs[rid][start:end].tolist(), start,
                                      runner.kv.slots(str(rid), 0, end), True))
            ids += experts[rid][start:end].tolist()
        steps.append(runner.forward(chunks, ids))
    return steps


@torch.no_grad()
def test_a_float16_kv_cache_is_attention_over_the_rounded_keys_and_values(model, prompts):
    """The fused ops (decoder, rope_write_kv, decode attention over the pool) against the torch
    path (keys and values rounded by ``.to`` when written, widened when gathered), on the same
    mixed steps; against the float32 cache: close, not equal."""
    config = model.config
    seqs = [torch.tensor(p) for p in prompts[1:4]]
    experts = [model.route(s[None])[0][0] for s in seqs]
    plan = [[(0, 0, 6), (1, 0, 3), (2, 0, 29)], [(0, 6, 16), (1, 3, 8), (2, 29, 30)],
            [(0, 16, 17), (1, 8, 9)]]
    runs = {}
    for name, fused, dtype in (("fused", True, torch.float16), ("torch", False, torch.float16),
                               ("float32", True, torch.float32)):
        kv = PagedKVCache(config.num_hidden_layers, 30, 4, config.num_key_value_heads,
                          config.hidden_size // config.num_attention_heads, dtype)
        runs[name] = torch.cat(run_plan(ModelRunner(model, kv, fused=fused), seqs, experts,
                                        plan))
        assert kv.keys[0].dtype == dtype
    torch.testing.assert_close(runs["fused"], runs["torch"], atol=2e-5, rtol=0)
    torch.testing.assert_close(runs["fused"], runs["float32"], atol=5e-3, rtol=0)
    assert not torch.equal(runs["fused"], runs["float32"])


@torch.no_grad()
def compensated(compensation: bool):
    """A tiny ReadME model with compensation biases (if asked for) drawn at random, not zero."""
    model = readme(compensation=compensation)
    for layer in model.model.layers:
        if layer.mlp.compensation is not None:
            layer.mlp.compensation.normal_()
    return model


def prefilled_step(runner: ModelRunner, seqs: list[list[int]],
                   experts: list[list[int]] | None) -> list[RunnerChunk]:
    """Each sequence but its last token prefilled through ``runner`` (``experts[i]``: sequence
    i's expert per token; None: the layers' gates route), then the decode step of the last
    tokens, each request's chunk."""
    kv = runner.kv
    for rid, s in enumerate(seqs):
        kv.admit(str(rid), len(s))
        kv.grow(str(rid), len(s) - 1)
    runner.forward([RunnerChunk(s[:-1], 0, kv.slots(str(rid), 0, len(s) - 1), False)
                    for rid, s in enumerate(seqs)],
                   None if experts is None else [e for ids in experts for e in ids[:-1]])
    for rid, s in enumerate(seqs):
        kv.grow(str(rid), len(s))
    return [RunnerChunk(s[-1:], len(s) - 1, kv.slots(str(rid), 0, len(s)), True)
            for rid, s in enumerate(seqs)]


@pytest.mark.parametrize("compensation", [False, True])
@torch.no_grad()
def test_the_whole_step_decoder_equals_the_layer_loop(prompts, compensation):
    """Layers with and without a shared expert, a dense layer, compensation biases: the fused
    ops' one-call decode step (rows sorted by expert once, each expert adding into its rows
    in place) equals the per-layer loop (gather, compute, scatter-add) to float rounding."""
    if cpu_ops.load() is None:
        pytest.skip("no fused CPU ops here")
    model = compensated(compensation)
    config = model.config
    kv = PagedKVCache(config.num_hidden_layers, 20, 4, config.num_key_value_heads,
                      config.hidden_size // config.num_attention_heads)
    runner = ModelRunner(model, kv)
    decoder = runner.decoder
    assert decoder is not None and decoder.num_layers == config.num_hidden_layers
    seqs = [prompts[1][:12], prompts[2], prompts[3][:7]]
    experts = [model.route(torch.tensor([s]))[0][0].tolist() for s in seqs]
    step = prefilled_step(runner, seqs, experts)
    routed = [ids[-1] for ids in experts]
    whole = runner.forward(step, routed)
    runner.decoder = None
    assert len(set(routed)) > 1  # the rows really are sorted and put back
    torch.testing.assert_close(runner.forward(step, routed), whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16])
@torch.no_grad()
def test_the_one_region_step_equals_the_per_layer_calls(kv_dtype, threads):
    """A decode step of 2-48 rows runs its layers as phases of one parallel region (team.cpp):
    bit for bit the per-layer calls' result (layer.cpp) when every expert holds two rows or
    more; an expert's single row goes through its panels there, where the per-layer calls use
    at::mm: equal to float rounding. Shared, routed and dense layers, compensation biases."""
    ops = cpu_ops.load()
    if ops is None or not ops.panels_supported():
        pytest.skip("the one-region step needs the fused ops' panels (AVX2 or AVX-512)")
    model = compensated(True)
    config = model.config
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (12, 5, 30, 7, 9, 21)]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for routed in ([0, 1, 0, 1, 2, 2], [0, 1, 1, 0, 0, 2]):  # the second: expert 2 alone
            kv = PagedKVCache(config.num_hidden_layers, 60, 4, config.num_key_value_heads,
                              config.hidden_size // config.num_attention_heads, kv_dtype)
            runner = ModelRunner(model, kv)
            step = prefilled_step(runner, seqs, [[r] * len(s) for s, r in zip(seqs, routed,
                                                                             strict=True)])
            runner.decoder.team = True
            team = runner.forward(step, routed)
            runner.decoder.team = False
            layers = runner.forward(step, routed)
            if routed.count(2) > 1:
                assert torch.equal(team, layers)
            else:
                torch.testing.assert_close(team, layers, rtol=0, atol=1e-5)
    finally:
        torch.set_num_threads(previous)


@torch.no_grad()
def test_products_only_runs_the_products_and_leaves_the_kv_cache(model):
    """engine_speed's matmul floor: the one-region step with every op but its products
    skipped writes no key or value; a step that would not run as one region is refused."""
    ops = cpu_ops.load()
    if ops is None or not ops.panels_supported():
        pytest.skip("the one-region step needs the fused ops' panels (AVX2 or AVX-512)")
    config = model.config
    kv = PagedKVCache(config.num_hidden_layers, 20, 4, config.num_key_value_heads,
                      config.hidden_size // config.num_attention_heads)
    decoder = ModelRunner(model, kv).decoder
    assert decoder.team_runs(2) and decoder.team_runs(48) and not decoder.team_runs(49)
    assert decoder.team_runs(1) == (ops.panel_min_rows() == 1)
    rope = torch.randn(1, config.hidden_size // config.num_attention_heads)
    contexts = [torch.tensor([0, 5]), torch.tensor([7, 1, 2])]
    before = [t.clone() for t in kv.keys + kv.values]
    decoder.products_only = True
    try:
        hidden = decoder.step([3, 4], contexts, rope, rope, [0, 0], [1, 0])
        decoder.team = False  # the same step off the one region
        with pytest.raises(RuntimeError, match="products_only times the one-region step"):
            decoder.step([3, 4], contexts, rope, rope, [0, 0], [1, 0])
    finally:
        decoder.products_only = False
        decoder.team = True
    assert hidden.shape == (2, config.hidden_size) and torch.isfinite(hidden).all()
    assert all(torch.equal(a, b) for a, b in zip(before, kv.keys + kv.values, strict=True))
    decoder.step([3, 4], contexts, rope, rope, [0, 0], [1, 0])
    assert not all(torch.equal(a, b) for a, b in zip(before, kv.keys + kv.values, strict=True))


@pytest.mark.parametrize("rows", [1, 2])
@torch.no_grad()
def test_the_decoder_refuses_a_routing_its_layers_cannot_serve(model, rows):
    """One row (one call a layer half) or two (one region where the panels run): an expert
    past the layers' or no routing at all is refused before any layer runs, KV untouched."""
    if cpu_ops.load() is None:
        pytest.skip("no fused CPU ops here")
    config = model.config
    kv = PagedKVCache(config.num_hidden_layers, 20, 4, config.num_key_value_heads,
                      config.hidden_size // config.num_attention_heads)
    decoder = ModelRunner(model, kv).decoder
    rope = torch.randn(1, config.hidden_size // config.num_attention_heads)
    contexts = [torch.tensor([0, 5]), torch.tensor([7, 1, 2])][:rows]
    before = [t.clone() for t in kv.keys + kv.values]
    with pytest.raises(RuntimeError, match=f"expert {config.num_experts} outside the layer's"):
        decoder.step([3] * rows, contexts, rope, rope, [0] * rows,
                     [config.num_experts] + [0] * (rows - 1))
    with pytest.raises(RuntimeError, match="needs the step's routing"):
        decoder.step([3] * rows, contexts, rope, rope, [0] * rows, [])
    assert all(torch.equal(a, b) for a, b in zip(before, kv.keys + kv.values, strict=True))


@torch.no_grad()
def test_only_decode_steps_multiply_through_the_prepacked_copies(model, prompts):
    """A step with prefill rows brings row counts of its own to every matrix: through oneDNN
    each would be a cached primitive, evicting the decode steps' (``runner.forward``); the
    panels (AVX2 and AVX-512 CPUs, in oneDNN's place) are kept to the same decode steps."""
    if not prepack_applies(torch.device("cpu"), torch.float32):
        pytest.skip("torch without oneDNN: nothing is prepacked")
    config = model.config
    kv = PagedKVCache(config.num_hidden_layers, 20, 4, config.num_key_value_heads,
                      config.hidden_size // config.num_attention_heads)
    runner = ModelRunner(model, kv)
    seqs = prompts[1:3]
    experts = [model.route(torch.tensor([s]))[0][0].tolist() for s in seqs]

    def onednn_calls(chunks, ids) -> int:
        with torch.profiler.profile() as prof:
            runner.forward(chunks, ids)
        return sum(e.count for e in prof.key_averages()
                   if e.key.startswith("mkldnn::") or e.key == "readmoe::panel_linear")

    for rid, s in enumerate(seqs):
        kv.admit(str(rid), len(s))
        kv.grow(str(rid), len(s) - 1)
    prefill = [RunnerChunk(s[:-1], 0, kv.slots(str(rid), 0, len(s) - 1), False)
               for rid, s in enumerate(seqs)]  # (the LM head's few rows may use oneDNN)
    assert onednn_calls(prefill, [e for ids in experts for e in ids[:-1]]) == 0
    for rid, s in enumerate(seqs):
        kv.grow(str(rid), len(s))
    decode = [RunnerChunk(s[-1:], len(s) - 1, kv.slots(str(rid), 0, len(s)), True)
              for rid, s in enumerate(seqs)]
    assert onednn_calls(decode, [ids[-1] for ids in experts]) > 0


def test_attention_laid_out_as_cuda_returns_it_serves_the_same_tokens(model, prompts,
                                                                      hf_outputs, monkeypatch):
    """CUDA's attention kernels may return [B, H, L, D] stored as [B, L, H, D] (fp32 on an
    H100 did): the runner flattens it as it is laid out, not by a view that only a
    contiguous tensor allows."""
    from readmoe.serve import runner

    plain = runner._sdpa

    def strided(*args, **kwargs):
        out = plain(*args, **kwargs)
        return out.transpose(1, 2).contiguous().transpose(1, 2)  # same values, CUDA's layout

    monkeypatch.setattr(runner, "_sdpa", strided)
    eng = engine(model, fused_ops=False)
    outs = eng.generate(prompts, SamplingParams(max_tokens=10))
    assert [o.token_ids for o in outs] == hf_outputs


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_greedy_equals_hf_generate_under_every_scheduler(model, prompts, hf_outputs, scheduler):
    eng = engine(model, scheduler)  # 14 blocks of 4: not every request fits at once
    ids = [eng.add_request(p, SamplingParams(max_tokens=10)) for p in prompts]
    finished = []
    while eng.has_unfinished():
        finished += [out.request_id for out in eng.step() if out.finished]
    assert sorted(finished) == sorted(ids)  # each request finishes exactly once
    assert [eng.output(i).token_ids for i in ids] == hf_outputs
    assert eng.kv.num_free == eng.kv.num_blocks
    assert eng.metrics()["requests"] == len(prompts)


@torch.no_grad()
def test_router_hysteresis_serves_as_hf_generate_and_routes_as_the_model(prompts):
    model = readme()
    model.config.router_hysteresis = 0.7
    eng = engine(model, "expert-aware")
    ids = [eng.add_request(p, SamplingParams(max_tokens=10)) for p in prompts]
    while eng.has_unfinished():
        eng.step()
    for request_id, prompt in zip(ids, prompts, strict=True):
        out = eng.output(request_id).token_ids
        reference = model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False)
        assert out == reference[0, len(prompt):].tolist()
        served = next(r for r in eng.queue.finished if r.request_id == request_id)
        whole = model.route(torch.tensor([prompt + out[:-1]]))[0][0].tolist()
        assert served.prompt_experts + served.output_experts == whole


def test_aborts_free_their_blocks(model, prompts):
    eng = engine(model, kv_blocks=30)
    ids = [eng.add_request(p, SamplingParams(max_tokens=12)) for p in prompts * 2]
    eng.abort(ids[7])  # still waiting for admission
    for _ in range(6):
        eng.step()
    eng.abort(ids[1])  # mid-generation
    eng.abort(ids[2])
    while eng.has_unfinished():
        eng.step()
    reasons = [eng.output(i).finish_reason for i in ids]
    assert reasons.count("abort") == 3 and reasons.count("length") + reasons.count("eos") == 5
    assert eng.kv.num_free == eng.kv.num_available == eng.kv.num_blocks


def test_seeded_sampling_ignores_batch_composition(model, prompts):
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=3)
    alone = engine(model).generate([prompts[0]], params)[0].token_ids
    others = SamplingParams(max_tokens=8, temperature=0.8, seed=11)
    crowded = engine(model).generate(prompts, [others, params, others, others])
    unseeded = engine(model).generate([prompts[1]] * 2, SamplingParams(8, temperature=1.0))
    assert crowded[1].token_ids == engine(model).generate([prompts[1]], params)[0].token_ids
    assert engine(model).generate([prompts[0]], params)[0].token_ids == alone
    assert unseeded[0].token_ids != unseeded[1].token_ids  # fresh entropy per request


def test_stop_strings_cut_the_text(model, prompts):
    tokenizer = char_tokenizer()
    full = engine(model).generate([prompts[3]], SamplingParams(max_tokens=10))[0]
    text = tokenizer.decode(full.token_ids, skip_special_tokens=True)
    stop = text[4:6]
    out = engine(model).generate([prompts[3]], SamplingParams(max_tokens=10, stop=[stop]))[0]
    assert out.finish_reason == "stop"
    assert out.text == text[:text.find(stop)]
    assert len(out.token_ids) < len(full.token_ids)


def test_streaming_yields_tokens_in_order(model, prompts, hf_outputs):
    eng = engine(model)
    ids = [eng.add_request(p, SamplingParams(max_tokens=10)) for p in prompts]
    assert list(eng.stream(ids[2])) == hf_outputs[2]
    assert list(eng.stream(ids[0])) == hf_outputs[0]  # finished meanwhile: replayed


@pytest.mark.parametrize("router,overrides", [("none", dict(num_experts=1)), ("layerwise", {})])
def test_prune_like_and_layerwise_models_match_hf(prompts, router, overrides):
    model = readme(router, **overrides)
    outs = engine(model, "expert-aware").generate(prompts, SamplingParams(max_tokens=6))
    for p, out in zip(prompts, outs, strict=True):
        ref = model.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False)
        assert out.token_ids == ref[0, len(p):].tolist()


def test_text_prompts_and_workload_replay(model):
    eng = engine(model, "expert-aware")
    out = eng.generate(["hello"], SamplingParams(max_tokens=3, ignore_eos=True))[0]
    assert len(out.token_ids) == 3 and out.finished
    specs = [RequestSpec(f"w{i}", 0.01 * i, Prompt(4, tokens=(5, 6, 7, 8 + i)), 4)
             for i in range(4)]
    result = eng.run_workload(specs)
    assert result["requests"] == 4 and result["output_tokens"] == 16
    assert result["ttft_s"]["mean"] > 0 and result["distinct_experts_per_step"] >= 1


def test_release_forgets_finished_and_aborted_requests(model, prompts):
    eng = engine(model)
    done, cut = (eng.add_request(p, SamplingParams(max_tokens=4)) for p in prompts[:2])
    eng.step()
    with pytest.raises(ReadmoeError, match="abort it first"):
        eng.release(cut)
    eng.abort(cut)
    while eng.has_unfinished():
        eng.step()
    assert eng.release(done).token_ids == eng.generate([prompts[0]], SamplingParams(4))[0].token_ids
    assert eng.release(cut).finish_reason == "abort"
    with pytest.raises(ReadmoeError, match="unknown request id"):
        eng.output(done)
    assert eng.metrics()["requests"] == 1  # only the generate() call's request is left


def test_a_bounded_step_history_keeps_the_latest_reports(model, prompts):
    eng = Engine(model, char_tokenizer(), "fcfs", Budget(64, 8), kv_blocks=40, block_size=4,
                 step_history=3)
    eng.generate(prompts[:2], SamplingParams(max_tokens=6, ignore_eos=True))
    assert eng.num_steps > 3 and len(eng.steps) == 3
    assert [s.step for s in eng.steps] == list(range(eng.num_steps - 3, eng.num_steps))
