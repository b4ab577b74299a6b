"""route_next: one batched router step equals each request's own cached route() call."""

from __future__ import annotations

import torch

from readmoe.model import RouterCache
from readmoe.serve.router_step import route_next
from tests.serve.test_engine import VOCAB, readme


def test_batched_step_equals_per_request_routing():
    model = readme()
    router = model.model.router
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen) for n in (3, 11, 1, 7)]
    ours, theirs = [RouterCache() for _ in prompts], [RouterCache() for _ in prompts]
    with torch.inference_mode():
        for prompt, a, b in zip(prompts, ours, theirs, strict=True):
            model.route(prompt[None], a)
            model.route(prompt[None], b)
        for _ in range(5):  # several steps: the caches keep growing in step
            tokens = torch.randint(3, VOCAB, (len(prompts),), generator=gen).tolist()
            batched = route_next(router, tokens, ours)
            single = [int(model.route(torch.tensor([[t]]), cache)[0][0, 0])
                      for t, cache in zip(tokens, theirs, strict=True)]
            assert batched == single
        for a, b in zip(ours, theirs, strict=True):
            assert a.length == b.length
            for ka, kb in zip(a.keys, b.keys, strict=True):
                torch.testing.assert_close(ka, kb, atol=1e-6, rtol=0)
    assert route_next(router, [], []) == []
