"""The serving engine: requests in, tokens out, one scheduled step at a time.

One step: admit arrived requests the KV cache can hold; ask the scheduler (through
``RequestQueue.schedule``) for a batch of chunks; run it (``ModelRunner``); sample one token per
sampling chunk; route each new token at once with the pre-gating router, so its expert is known
(``RequestQueue.complete``) before the step that feeds it back; free the KV of ended requests.

The router runs ahead of the backbone. On admission the whole prompt is routed, so
``Request.prompt_experts`` are real and the scheduler (and an expert cache reading the queue)
sees every pending token's expert; the tokens a step sampled are then routed together, one
batched router step whose keys and values sit at the backbone's KV slots
(``router_step.PagedRouter``). With a layer-wise router the experts are ``UNKNOWN_EXPERT``
until each layer's gate runs inside the runner; a model without routed choice
(``router_type`` "none" with one expert, e.g. the prune baseline) uses expert 0.

Admission policy: requests are admitted in arrival order, each only when the KV cache can
reserve its largest footprint (prompt + max_tokens - 1 tokens, see kv_cache.py); the first one
that does not fit blocks those behind it (no overtaking, so a long request is never starved).
Only admitted requests reach the scheduler, and running requests never run out of KV blocks.

Expert residency: with an ``ExpertStore`` the runner takes routed weights from the store's fast
tier. Each step is planned by an ``ExpertPlanner`` over the store's cache, the very planner the
simulator runs: the scheduler is told what is resident (``CacheView``), then every routed
layer's access is planned at once (hits, victims, slots, and with ``CoDesign`` the predicted
future and the next step's prefetches), and the store executes the plan: with ``prefetch`` all
of the step's loads are issued at its start and run on the copy engine while compute goes
layer by layer; without, each layer loads its misses when reached. A layer-wise model's experts
are known only inside each layer, so each layer is planned as it runs, on demand, with no
future. The model's own stacked routed weights are then not read.

Time is wall clock (``time.perf_counter``) relative to the engine's start; the queue's finished
requests and ``steps`` (StepReports) feed ``serve.metrics.aggregate`` (``metrics()``). A
long-running server bounds ``steps`` to the last ``step_history`` reports (and ``release``s
finished requests), so its memory stays flat; ``num_steps`` counts every step.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch

from readmoe.errors import ReadmoeError
from readmoe.serve.experts import CoDesign, StepPlan
from readmoe.serve.experts.store import ExpertStore, StepAccess
from readmoe.serve.experts.stream import DenseStream
from readmoe.serve.graphs import GraphedDecode, graphs_apply
from readmoe.serve.kv_cache import PagedKVCache, kv_dtype_of
from readmoe.serve.metrics import aggregate
from readmoe.serve.placement import experts_offloaded
from readmoe.serve.queue import RequestQueue
from readmoe.serve.router_graphs import GraphedRouter
from readmoe.serve.router_step import PagedRouter, prompt_experts
from readmoe.serve.runner import ModelRunner, RunnerChunk
from readmoe.serve.sampling import SamplingParams, find_stop, sample
from readmoe.serve.schedulers import Scheduler, make_scheduler
from readmoe.serve.types import UNKNOWN_EXPERT, Budget, Request, StepReport
from readmoe.serve.workload import RequestSpec

DEFAULT_BUDGET = Budget(max_tokens=256, max_seqs=32)
WORKLOAD_PARAMS = SamplingParams(ignore_eos=True)
"""Replayed workloads produce exactly each spec's max_tokens (vLLM's benchmark convention)."""


@dataclass(frozen=True)
class RequestOutput:
    """A request's progress after a step: the tokens it just produced and all so far.

    ``text`` is the decoded output (cut before a stop string), filled once ``finished``;
    ``finish_reason`` is "length", "eos", "stop" or "abort".
    """

    request_id: str
    new_token_ids: list[int]
    token_ids: list[int]
    finished: bool
    finish_reason: str | None = None
    text: str = ""


@dataclass
class _Sequence:
    """The engine's side of one request: its tokens, sampler state and latest expert."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator
    arrival_time: float
    output_ids: list[int] = field(default_factory=list)
    expert: int = -1  # its latest token's routed expert (the router's hysteresis); -1: none
    request: Request | None = None
    finish_reason: str | None = None
    text: str = ""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def output(self, new: list[int]) -> RequestOutput:
        return RequestOutput(self.request_id, new, list(self.output_ids), self.finished,
                             self.finish_reason, self.text)


class Engine:
    """Continuous batching over a ReadME model with a paged KV cache, optionally with routed
    experts offloaded to an ``ExpertStore`` (the caller owns it and closes it), with the
    runner's matrices in int8 or bf16 (``quantize``, CPU: see ``serve/quantized.py``), the KV
    cache in float16 (``kv_dtype``, see ``serve/kv_cache.py``); on CUDA its decode steps replay
    CUDA graphs unless ``cuda_graphs`` is False (``serve/graphs.py``)."""

    def __init__(self, model: torch.nn.Module, tokenizer, scheduler: str | Scheduler = "fcfs",
                 budget: Budget = DEFAULT_BUDGET, kv_blocks: int = 512, block_size: int = 16,
                 expert_store: ExpertStore | DenseStream | None = None, prefetch: bool = True,
                 codesign: CoDesign | None = None, step_history: int | None = None,
                 quantize: str = "none", fused_ops: bool = True, prepack: bool = True,
                 kv_dtype: str = "auto", cuda_graphs: bool = True) -> None:
        config = model.config
        codesign = codesign or CoDesign()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.scheduler = make_scheduler(scheduler) if isinstance(scheduler, str) else scheduler
        self.budget = budget
        self.layerwise = config.router_type == "layerwise"
        self.pregating = model.model.router is not None
        if not (self.pregating or self.layerwise) and config.needs_routing:
            raise ReadmoeError(f"the model has {config.num_experts} routed experts and no router "
                               "(router_type 'none'): attach one before serving")
        if expert_store is not None:
            expert_store.check_serves(model, quantize, prefetch, codesign)
        elif experts_offloaded(model):
            raise ReadmoeError("the model's routed experts were placed for offload "
                               "(place_for_offload): serve it with an ExpertStore")
        self.store = expert_store
        self.prefetch = prefetch and expert_store is not None
        self.planner = expert_store.planner(codesign) if expert_store is not None else None
        attn = model.model.layers[0].self_attn
        weight = model.model.embed_tokens.weight
        self.kv = PagedKVCache(config.num_hidden_layers, kv_blocks, block_size,
                               config.num_key_value_heads, attn.head_dim,
                               kv_dtype_of(kv_dtype, weight.dtype), weight.device)
        self.runner = ModelRunner(model, self.kv, pack_experts=expert_store is None,
                                  quantize=quantize, fused=fused_ops, prepack=prepack)
        if cuda_graphs and graphs_apply(self.runner):
            positions = getattr(config, "max_position_embeddings", None) or kv_blocks * block_size
            self.runner.graphs = GraphedDecode(self.runner, budget.max_seqs,
                                               min(kv_blocks * block_size, positions))
        # the router's pools hold the backbone's slots and its spare one (graphs pad to it)
        self.router = (PagedRouter(model, self.kv.spare_slot + 1, self.runner.ops)
                       if self.pregating else None)
        if self.router is not None and self.runner.graphs is not None:
            self.router.graphs = GraphedRouter(self.router, self.kv.spare_slot, budget.max_seqs,
                                               self.runner.graphs.lengths[-1])
        eos = model.generation_config.eos_token_id
        eos = tokenizer.eos_token_id if eos is None else eos
        self.eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.queue = RequestQueue()
        # the latest step reports (all, or the last ``step_history`` for a long-running server)
        self.steps: deque[StepReport] = deque(maxlen=step_history)
        self.num_steps = 0  # steps run so far: the clock of step plans
        self._seqs: dict[str, _Sequence] = {}
        self._arrived: list[_Sequence] = []  # not yet admitted, in arrival order
        self._next_id = 0
        self._start = time.perf_counter()

    def now(self) -> float:
        """Seconds since the engine started (the clock of arrivals and output times)."""
        return time.perf_counter() - self._start

    def add_request(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
                    request_id: str | None = None, arrival_time: float | None = None) -> str:
        """Queue a prompt (text or token ids); returns its request id."""
        params = params or SamplingParams()
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ReadmoeError("the prompt has no tokens")
        if request_id is None:
            request_id, self._next_id = f"req-{self._next_id}", self._next_id + 1
        if request_id in self._seqs:
            raise ReadmoeError(f"request id {request_id!r} is already in use")
        footprint = len(ids) + params.max_tokens - 1
        if self.kv.blocks_for(footprint) > self.kv.num_blocks:
            raise ReadmoeError(f"request {request_id!r} needs {footprint} tokens of KV cache; "
                               f"the cache holds {self.kv.num_blocks * self.kv.block_size}")
        seq = _Sequence(request_id, ids, params, params.generator(),
                        self.now() if arrival_time is None else arrival_time)
        self._seqs[request_id] = seq
        self._arrived.append(seq)
        return request_id

    def abort(self, request_id: str) -> None:
        """Drop an unfinished request at once and free its KV blocks (no-op if finished)."""
        seq = self._sequence(request_id)
        if seq.finished:
            return
        seq.finish_reason = "abort"
        if seq in self._arrived:
            self._arrived.remove(seq)
        if seq.request is not None:  # admitted: in the queue, holding KV blocks
            self.queue.abort(request_id)
            self.kv.free(request_id)

    def release(self, request_id: str) -> RequestOutput:
        """Forget a finished (or aborted) request and return its final output.

        Why: the engine keeps every request it has seen, for ``output`` and ``metrics``; a
        long-running server calls this once it has delivered a result, so finished requests
        do not pile up in memory (they then leave ``metrics()`` too)."""
        seq = self._sequence(request_id)
        if not seq.finished:
            raise ReadmoeError(f"request {request_id!r} has not finished: abort it first")
        del self._seqs[request_id]
        if seq.request is not None and seq.request in self.queue.finished:
            self.queue.finished.remove(seq.request)
        return seq.output([])

    def has_unfinished(self) -> bool:
        return bool(self._arrived or self.queue.waiting or self.queue.running)

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Run one scheduled step; return the outputs of the requests that produced a token."""
        self._admit()
        started = self.now()
        batch = self.queue.schedule(self.scheduler, self.budget,
                                    self.planner.view() if self.planner is not None else None)
        if not batch.chunks:
            return []
        chunks, experts = [], []
        for chunk in batch.chunks:
            seq = self._seqs[chunk.request_id]
            end = chunk.start + chunk.num_tokens
            self.kv.grow(seq.request_id, end)
            tokens = (seq.prompt_ids + seq.output_ids)[chunk.start:end]
            chunks.append(RunnerChunk(tokens, chunk.start, self.kv.slots(seq.request_id, 0, end),
                                      chunk.samples))
            experts.extend(chunk.experts)
        source, before = None, None
        if self.store is not None:
            before = self.store.stats
            source = self._step_access(batch)
        logits = self.runner.forward(chunks, None if self.layerwise else experts,
                                     source)  # [S, V]
        if source is not None:
            source.finish()
        sampling = [self._seqs[c.request_id] for c in batch.chunks if c.samples]
        tokens = sample(logits, [s.params for s in sampling], [s.generator for s in sampling])
        revealed = self._reveal([seq for seq, token in zip(sampling, tokens, strict=True)
                                 if self._accept(seq, token)], sampling)
        for request in self.queue.complete(batch, revealed, self.now()):
            seq = self._seqs[request.request_id]
            if seq.finish_reason != "stop":  # a stop already set the text, cut
                seq.finish_reason = seq.finish_reason or "length"
                seq.text = self._decode(seq.output_ids)
            self.kv.free(seq.request_id)
        load_s = stall_s = 0.0
        if before is not None:
            spent = self.store.stats.since(before)
            load_s, stall_s = spent.load_s, spent.stall_s
        self.steps.append(StepReport(self.num_steps, started, self.now(), batch.num_tokens,
                                     batch.num_seqs, len(batch.experts), load_s, stall_s,
                                     batch.experts, tuple(experts)))
        self.num_steps += 1
        return [seq.output([token]) for seq, token in zip(sampling, tokens, strict=True)]

    def stream(self, request_id: str) -> Iterator[int]:
        """Yield ``request_id``'s tokens as they are produced, stepping the engine (which
        advances every other request too; their outputs stay readable via ``output``)."""
        seq = self._sequence(request_id)
        sent = 0
        while True:
            while sent < len(seq.output_ids):
                sent += 1
                yield seq.output_ids[sent - 1]
            if seq.finished:
                return
            self.step()

    def output(self, request_id: str) -> RequestOutput:
        """A request's output so far (final once finished)."""
        return self._sequence(request_id).output([])

    def generate(self, prompts: Sequence[str | Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """Submit every prompt together and run until all finish; outputs in prompt order."""
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
        while not all(self._seqs[i].finished for i in ids):
            self.step()
        return [self.output(i) for i in ids]

    def run_workload(self, specs: Sequence[RequestSpec],
                     params: SamplingParams = WORKLOAD_PARAMS) -> dict:
        """Replay ``specs`` (arrival times relative to now, each spec's own max_tokens) and
        return ``serve.metrics.aggregate`` over its requests and steps."""
        pending = sorted(specs, key=lambda s: s.arrival_time)
        base, first_step = self.now(), self.num_steps
        store_before = self.store.stats if self.store is not None else None
        added = []
        while pending or self.has_unfinished():
            while pending and base + pending[0].arrival_time <= self.now():
                spec = pending.pop(0)
                prompt = spec.prompt.tokens if spec.prompt.tokens is not None else spec.prompt.text
                added.append(self.add_request(prompt, replace(params, max_tokens=spec.max_tokens),
                                              spec.request_id, base + spec.arrival_time))
            if self.has_unfinished():
                self.step()
            elif pending:
                time.sleep(max(0.0, base + pending[0].arrival_time - self.now()))
        done = [self._seqs[i].request for i in added if self._seqs[i].finish_reason != "abort"]
        cache = self.store.stats.since(store_before) if store_before is not None else None
        return aggregate(done, [s for s in self.steps if s.step >= first_step], cache)

    def metrics(self) -> dict:
        """``serve.metrics.aggregate`` over every finished (not aborted) request and step."""
        return aggregate(self.queue.finished, self.steps,
                         self.store.stats if self.store is not None else None)

    def _sequence(self, request_id: str) -> _Sequence:
        seq = self._seqs.get(request_id)
        if seq is None:
            raise ReadmoeError(f"unknown request id {request_id!r}: use the id add_request "
                               "returned")
        return seq

    def _step_access(self, batch) -> StepAccess:
        """Plan this step's expert accesses and start executing them on the store."""
        step = self.num_steps
        if self.layerwise:
            return self.store.begin_step(StepPlan(step), prefetch=False, plan_layer=(
                lambda layer, experts: self.planner.plan_layer(step, layer, experts)))
        plan = self.planner.plan(step, batch, [*self.queue.running, *self.queue.waiting],
                                 self.budget.max_tokens)
        return self.store.begin_step(plan, self.prefetch)

    def _admit(self) -> None:
        while self._arrived:
            seq = self._arrived[0]
            footprint = len(seq.prompt_ids) + seq.params.max_tokens - 1
            if not self.kv.can_admit(footprint):
                return
            self._arrived.pop(0)
            self.kv.admit(seq.request_id, footprint)
            seq.request = Request(seq.request_id, seq.arrival_time, self._route_prompt(seq),
                                  seq.params.max_tokens)
            self.queue.add(seq.request)

    def _route_prompt(self, seq: _Sequence) -> list[int]:
        if self.router is not None:  # its router keys go where its backbone keys will
            self.kv.grow(seq.request_id, len(seq.prompt_ids))
            experts = self.router.route_prompt(
                seq.prompt_ids, self.kv.slots(seq.request_id, 0, len(seq.prompt_ids)))
            seq.expert = experts[-1]
            return experts
        experts = prompt_experts(self.model, seq.prompt_ids)
        return [UNKNOWN_EXPERT] * len(seq.prompt_ids) if experts is None else experts

    def _accept(self, seq: _Sequence, token: int) -> bool:
        """Record a sampled token; return whether it will be fed back (the request goes on)."""
        seq.output_ids.append(token)
        params = seq.params
        if token in self.eos_ids and not params.ignore_eos:
            seq.finish_reason = "eos"
        elif params.stop:
            # a stop string ending at this token lies within its last len(stop) tokens, so
            # decode a short window per token and the whole output only on a match
            window = self._decode(seq.output_ids[-(max(map(len, params.stop)) + 4):])
            if find_stop(window, params.stop) is not None:
                text = self._decode(seq.output_ids)
                cut = find_stop(text, params.stop)
                if cut is not None:
                    seq.finish_reason, seq.text = "stop", text[:cut]
        return not seq.finished and len(seq.output_ids) < params.max_tokens

    def _reveal(self, going_on: list[_Sequence], sampling: list[_Sequence]
                ) -> dict[str, int | None]:
        """Each sampling request's new token's expert (None where the request ends), routed
        in one batched router call (``PagedRouter.step``)."""
        revealed: dict[str, int | None] = {seq.request_id: None for seq in sampling}
        if self.router is None:
            revealed.update({seq.request_id: UNKNOWN_EXPERT if self.layerwise else 0
                             for seq in going_on})
            return revealed
        contexts = []
        for seq in going_on:  # the new token's position is the context's last
            length = len(seq.prompt_ids) + len(seq.output_ids)
            self.kv.grow(seq.request_id, length)
            contexts.append(self.kv.slots(seq.request_id, 0, length))
        experts = self.router.step([seq.output_ids[-1] for seq in going_on], contexts,
                                   [seq.expert for seq in going_on])
        for seq, expert in zip(going_on, experts, strict=True):
            seq.expert = revealed[seq.request_id] = expert
        return revealed

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)
