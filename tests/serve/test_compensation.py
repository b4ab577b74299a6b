"""Serving a compensated model (issue 13, item 1): the engine's runner adds each row's
compensation bias exactly as the model's forward does."""

from __future__ import annotations

import pytest
import torch

from readmoe.serve.kv_cache import PagedKVCache
from readmoe.serve.runner import ModelRunner, RunnerChunk
from readmoe.serve.sampling import SamplingParams
from tests.serve.test_engine import VOCAB, engine, readme


def compensated(router: str = "pregating", **overrides):
    model = readme(router, compensation=True, **overrides)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.compensation.copy_(torch.randn(layer.mlp.compensation.shape,
                                                     generator=gen) * 0.5)
    return model


@torch.no_grad()
def test_runner_adds_the_bias_like_the_model():
    model = compensated()
    config = model.config
    kv = PagedKVCache(config.num_hidden_layers, 8, 4, config.num_key_value_heads,
                      config.hidden_size // config.num_attention_heads)
    runner = ModelRunner(model, kv)
    tokens = torch.randint(3, VOCAB, (13,), generator=torch.Generator().manual_seed(1))
    experts = model.route(tokens[None])[0][0]
    assert experts.unique().numel() > 1
    reference = model(tokens[None], expert_ids=experts[None]).logits[0, -1]
    kv.admit("r", len(tokens))
    kv.grow("r", len(tokens))
    logits = runner.forward([RunnerChunk(tokens.tolist(), 0, kv.slots("r", 0, len(tokens)),
                                         True)], experts.tolist())
    torch.testing.assert_close(logits[0], reference, atol=1e-4, rtol=0)
    with torch.no_grad():  # the check can fail: without the bias the logits move
        for layer in model.model.layers:
            layer.mlp.compensation.zero_()
    assert (model(tokens[None], expert_ids=experts[None]).logits[0, -1]
            - reference).abs().max() > 1e-3


@pytest.mark.parametrize("router,overrides", [("pregating", {}), ("layerwise", {}),
                                              ("none", dict(num_experts=1))])
def test_engine_greedy_equals_hf_generate(router, overrides):
    model = compensated(router, **overrides)
    prompts = [torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(n))
               .tolist() for n in (5, 11)]
    outs = engine(model).generate(prompts, SamplingParams(max_tokens=6))
    for prompt, out in zip(prompts, outs, strict=True):
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False)
        assert out.token_ids == ref[0, len(prompt):].tolist()
