"""Real routing traces for the serving experiments: a ReadME model's router on corpus text.

Why: the simulator's results (distinct experts per step, hit ratios, what prefetch hides)
depend on how experts follow each other in time, so they should come from the trained router
on real text, not from a synthetic process.

How a request is built. Lengths are drawn from the Chatbot Arena statistics
(``workload.ARENA_PROMPT`` / ``ARENA_OUTPUT``). Its prompt is a segment of a corpus document
(domains taken in turn, held-out documents by default, so the router has not trained on them)
and its "response" is the text that follows the prompt in the same document: routing is
teacher-forced. A server would route the tokens it samples; the model's own samples are not
what we want to measure here (a small model drifts into repetition, which would flatter the
cache), so each output token's expert is the router's real choice on real text that follows.
A request whose lengths do not fit any document is shortened to the longest one (counted in
``shortened``).

The simulator carries only prompt experts in a ``RequestSpec``; it asks its routing source to
continue them. ``ReplayRouting`` continues each prompt with the recorded sequence. With a
layer-wise model (gates inside the backbone) the trace also holds every layer's choice per
token; the simulator keys one expert per token for all layers, so ``specs`` / ``routing`` take
a ``layer`` whose choices stand for the token (stated wherever results use it).
"""

from __future__ import annotations

import random
from collections import defaultdict, deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from readmoe.errors import ReadmoeError
from readmoe.serve.workload import (
    ARENA_OUTPUT,
    ARENA_PROMPT,
    LengthModel,
    Prompt,
    RequestSpec,
    arrival_times,
)


@dataclass(frozen=True)
class RoutedRequest:
    """One request: ``tokens`` and ``experts`` cover the prompt and the fed-back outputs
    (``prompt_len + max_tokens - 1`` tokens); ``layers`` [tokens, L] for a layer-wise model."""

    request_id: str
    domain: str
    prompt_len: int
    max_tokens: int
    tokens: tuple[int, ...]
    experts: tuple[int, ...]
    layers: np.ndarray | None = None


class ReplayRouting:
    """A ``RoutingSource`` that continues each known prompt with its recorded sequence.

    Sequences are looked up by their prompt's experts; identical prompts are served in the
    order given (the simulator asks in arrival order). Each sequence is served once, so build
    a fresh one per simulation (``RoutedTrace.routing``).
    """

    def __init__(self, sequences: Sequence[tuple[int, Sequence[int]]]) -> None:
        self._by_prompt: dict[tuple[int, ...], deque[tuple[int, ...]]] = defaultdict(deque)
        for prompt_len, sequence in sequences:
            self._by_prompt[tuple(sequence[:prompt_len])].append(tuple(sequence))

    def extend(self, known: Sequence[int], length: int, rng: random.Random) -> list[int]:
        queue = self._by_prompt.get(tuple(known))
        if not queue:
            raise ReadmoeError(f"no recorded sequence left for a prompt of {len(known)} tokens")
        sequence = queue.popleft()
        if len(sequence) < length:
            raise ReadmoeError(f"recorded sequence has {len(sequence)} tokens, {length} asked")
        return list(sequence[:length])


@dataclass
class RoutedTrace:
    requests: list[RoutedRequest]
    num_experts: int
    router_type: str
    shortened: int = 0

    def _experts(self, request: RoutedRequest, layer: int | None) -> tuple[int, ...]:
        if layer is None:
            return request.experts
        if request.layers is None:
            raise ReadmoeError("this trace has no per-layer choices (a pre-gating model)")
        return tuple(int(e) for e in request.layers[:, layer])

    def specs(self, request_rate: float, *, burstiness: float = 1.0, seed: int = 0,
              layer: int | None = None) -> list[RequestSpec]:
        """The requests with arrivals at ``request_rate`` (vLLM's Gamma process)."""
        times = arrival_times(len(self.requests), request_rate, burstiness,
                              np.random.default_rng(seed))
        return [RequestSpec(r.request_id, float(t),
                            Prompt(r.prompt_len, tokens=r.tokens[:r.prompt_len],
                                   experts=self._experts(r, layer)[:r.prompt_len]),
                            r.max_tokens)
                for r, t in zip(self.requests, times, strict=True)]

    def routing(self, layer: int | None = None) -> ReplayRouting:
        """A fresh replay source of the recorded sequences (of ``layer`` if given)."""
        return ReplayRouting([(r.prompt_len, self._experts(r, layer)) for r in self.requests])


def _tokenized(tokenizer, corpus, split: str, max_docs: int) -> dict[str, list[list[int]]]:
    docs = {}
    for domain in corpus.domains:
        texts = corpus.documents(domain, split)[:max_docs]
        docs[domain] = [ids for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]
                        if ids] if texts else []
    return {d: v for d, v in docs.items() if v}


@torch.no_grad()
def route_corpus(model, tokenizer, corpus, num_requests: int, *, seed: int = 0,
                 split: str = "heldout", max_docs_per_domain: int = 300,
                 prompt_lengths: LengthModel = ARENA_PROMPT,
                 output_lengths: LengthModel = ARENA_OUTPUT) -> RoutedTrace:
    """``num_requests`` teacher-forced requests routed by ``model`` (module docstring).

    A pre-gating model's choices come from ``model.route``; a layer-wise model's from a
    forward pass with ``output_router_logits`` (every layer's gate, ``layers``), its per-token
    ``experts`` being the middle layer's choice.
    """
    router_type = model.config.router_type
    if router_type not in ("pregating", "layerwise"):
        raise ReadmoeError(f"traces need a learned router; this model's is {router_type!r}")
    docs = _tokenized(tokenizer, corpus, split, max_docs_per_domain)
    if not docs:
        raise ReadmoeError(f"corpus {corpus.path} has no {split} documents to route")
    rng = np.random.default_rng(seed)
    prompts = prompt_lengths.sample(rng, num_requests)
    outputs = output_lengths.sample(rng, num_requests)
    longest = max(len(ids) for domain_docs in docs.values() for ids in domain_docs)
    domains = sorted(docs)
    device = next(model.parameters()).device
    requests, shortened = [], 0
    for i in range(num_requests):
        prompt_len, max_tokens = int(prompts[i]), int(outputs[i])
        if prompt_len + max_tokens - 1 > longest:
            shortened += 1
            prompt_len = min(prompt_len, longest)
            max_tokens = longest - prompt_len + 1
        need = prompt_len + max_tokens - 1
        domain = domains[i % len(domains)]
        fitting = [ids for ids in docs[domain] if len(ids) >= need] or [
            ids for d in domains for ids in docs[d] if len(ids) >= need]
        doc = fitting[int(rng.integers(len(fitting)))]
        start = int(rng.integers(len(doc) - need + 1))
        tokens = doc[start:start + need]
        input_ids = torch.tensor([tokens], device=device)
        layers = None
        if router_type == "pregating":
            experts = model.route(input_ids)[0][0].tolist()
        else:
            layers = model(input_ids, output_router_logits=True).expert_ids[0].cpu().numpy()
            experts = layers[:, layers.shape[1] // 2].tolist()
        requests.append(RoutedRequest(f"req-{i}", domain, prompt_len, max_tokens, tuple(tokens),
                                      tuple(int(e) for e in experts), layers))
    return RoutedTrace(requests, model.config.num_experts, router_type, shortened)
