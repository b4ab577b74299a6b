"""Decode-only steps replayed from CUDA graphs, one graph per bucket of rows and context length.

Why: on a GPU a decode step of a small model is bound by kernel launches, not by arithmetic or
bytes: the runner's step is about 15 kernels a layer, each launched from Python, plus the host
work between them, while the GPU finishes each in microseconds. vLLM and gpt-fast capture the
decode step once per batch size in a CUDA graph and replay it (one launch a step); so does
this module.

What a graph holds is ``StaticDecode``: the runner's decode step with every shape fixed by its
input buffers. Rows are padded up to a bucket (``row_buckets``: 1, 2, 4, then every multiple of
8, as vLLM's capture sizes), each request's context slots up to a length bucket (powers of two
from 64), and attention masks each row past its own length: the runner's own decode attention
over the paged pool with a -inf bias (``ModelRunner._attention``, a direct group). Padding rows
write their keys and values into the cache's spare slot (``PagedKVCache.spare_slot``) and
attend to it alone. The routing changes every step and a graph cannot, so the MoE FFN runs
every routed expert on every row, one batched product per matrix (``torch.bmm`` over the
stacked experts), and each row keeps its own expert's output (and compensation). That is E
times the routed FFN's arithmetic, which a GPU has to spare at decode sizes; the weights read
are every expert's, what a batch of a few tokens reads anyway. A layer-wise router's gate
decides inside the graph the same way.

Graphs are captured when a bucket is first used (a warm-up run on a side stream, then the
capture, as torch's CUDA graph notes do) and share one memory pool. Steps the graphs do not
cover (more rows than the largest bucket, a context past ``max_len``, prefill chunks) run
eagerly. On a CPU (the tests), ``capture`` False runs the same static step directly.
"""

from __future__ import annotations

import bisect
import functools
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from readmoe.serve.attention_groups import AttentionGroup

if TYPE_CHECKING:
    from readmoe.serve.packed import PackedLayer
    from readmoe.serve.runner import ModelRunner, RunnerChunk

MIN_LENGTH = 64  # the smallest context bucket
MAX_LENGTH = 8192  # contexts captured at most (vLLM's max_seq_len_to_capture); longer: eager


def row_buckets(max_rows: int) -> list[int]:
    """Batch sizes captured: 1, 2, 4, every multiple of 8 below ``max_rows``, ``max_rows``."""
    return [s for s in (1, 2, 4, *range(8, max_rows, 8)) if s < max_rows] + [max_rows]


def length_buckets(max_len: int) -> list[int]:
    """Context lengths captured: powers of two from ``MIN_LENGTH`` below ``max_len``, then
    ``max_len``."""
    sizes, size = [], MIN_LENGTH
    while size < max_len:
        sizes.append(size)
        size *= 2
    return sizes + [max_len]


def bucket(value: int, sizes: Sequence[int]) -> int:
    """The smallest of ``sizes`` (ascending) holding ``value``."""
    return sizes[bisect.bisect_left(sizes, value)]


def graphs_apply(runner: ModelRunner) -> bool:
    """Whether this runner's decode steps can be captured: its weights on a CUDA device, its
    routed experts resident and packed, RoPE factors that depend on the position alone."""
    device = runner.model.device
    return (device.type == "cuda" and runner.quantize == "none"
            and runner.rope.static
            and all(layer.mlp.experts is None or packed.experts is not None
                    for layer, packed in zip(runner.layers, runner.packed, strict=True)))


class StaticDecode:
    """The runner's decode step as a function of fixed-shape inputs: tokens, positions, write
    slots, lengths and experts [R] (experts None: each layer's gate routes), context slots
    [R, L] (padded with any slot, masked by length). Writes the logits into ``out`` [R, V]."""

    def __init__(self, runner: ModelRunner, max_len: int) -> None:
        self.runner = runner
        # the factors of every position a context may reach, kept: the runner's table may be
        # replaced by a longer one later, this one stays where a graph read it
        self.cos, self.sin, _ = runner.rope.rows([max_len - 1])  # [>= max_len, D] each

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, write: torch.Tensor,
                 lengths: torch.Tensor, experts: torch.Tensor | None, context: torch.Tensor,
                 out: torch.Tensor) -> torch.Tensor:
        runner = self.runner
        rows, length = context.shape
        hidden = runner.model.model.embed_tokens(tokens)  # [R, H]
        cos = self.cos.index_select(0, positions)  # [R, D]
        sin = self.sin.index_select(0, positions)
        index = torch.arange(rows, device=tokens.device)  # [R]
        keys_at = torch.arange(length, device=tokens.device)  # [L]
        bias = hidden.new_zeros(rows, 1, 1, length).masked_fill_(
            (keys_at[None, :] >= lengths[:, None])[:, None, None], float("-inf"))  # [R,1,1,L]
        group = AttentionGroup(index[:, None], context.contiguous(), bias, index, index,
                                lengths, direct=True)
        for layer, (module, packed) in enumerate(zip(runner.layers, runner.packed,
                                                     strict=True)):
            hidden = runner._attention(layer, packed, hidden, cos, sin, write, [group],
                                       prepacked=False)
            hidden = self._ffn(layer, module.mlp, packed, hidden, experts, index)
        return runner.lm_head(runner._norm(runner.norm, hidden), out=out)  # [R, V]

    def _ffn(self, layer: int, mlp: torch.nn.Module, packed: PackedLayer,
             residual: torch.Tensor, experts: torch.Tensor | None,
             index: torch.Tensor) -> torch.Tensor:
        """residual [R, H] -> residual + shared expert + each row's routed expert (+ its
        compensation), every routed expert computed on every row."""
        runner = self.runner
        bias = mlp.compensation
        x = runner._norm(packed.post_attention_norm, residual)  # [R, H]
        glu = runner.glus[layer]
        out = residual if packed.shared is None else runner._expert(
            packed.shared, x, glu, residual, prepacked=False)
        if mlp.experts is None:
            return out if bias is None else out + bias[0]
        if experts is None:  # layer-wise router: this layer's gate decides now
            experts = mlp.gate(x).argmax(-1)  # [R]
        stacked = mlp.experts
        many = x.expand(stacked.gate_proj.shape[0], *x.shape)  # [E, R, H]
        gate = torch.bmm(many, stacked.gate_proj.transpose(1, 2))  # [E, R, I]
        up = torch.bmm(many, stacked.up_proj.transpose(1, 2))
        every = torch.bmm(packed.act(gate) * up, stacked.down_proj.transpose(1, 2))  # [E, R, H]
        routed = every[experts, index]  # [R, H]: each row its own expert's
        if bias is not None:
            routed = routed + bias[experts]
        return out + routed


def capture_graph(run: Callable[[], object],
                  pool: tuple[int, int] | None = None) -> torch.cuda.CUDAGraph:
    """``run`` captured as a CUDA graph (into ``pool`` if given), after the warm-up run on a
    side stream that torch's CUDA graph notes ask for. The warm-up is a real run: a step
    writes the keys and values the replay writes again, the same ones."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        run()
    return graph


class BucketGraphs:
    """What both graphed steps keep (the backbone's decode step here, the router's in
    ``router_graphs``): the buckets; the fixed-address inputs every graph reads, ``fields``
    values a row then each row's context length, and each row's context slots (padded with
    ``spare``, a KV slot no request owns); one graph per key, captured at its first use into
    one memory pool. From the first failed capture on, every step runs eagerly."""

    what = "a step"  # what a failed capture's warning names
    fallback = "steps run eagerly"

    def __init__(self, max_rows: int, max_len: int, capture: bool, spare: int, fields: int,
                 device: torch.device) -> None:
        self.capture = capture
        self.spare = spare
        self.rows = row_buckets(max_rows)
        self.lengths = length_buckets(min(max_len, MAX_LENGTH))
        rows, length = self.rows[-1], self.lengths[-1]
        # slices of these are what a graph reads, so a step copies its inputs in at once
        self._rows = torch.zeros(fields + 1, rows, dtype=torch.long, device=device)
        self._context = torch.zeros(rows, length, dtype=torch.long, device=device)
        self._graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self._pool = None  # the graphs' memory pool, made at the first capture
        self.steps = 0  # steps run through the buckets
        self.failure: str | None = None  # why capturing failed (then every step runs eagerly)

    @property
    def captured(self) -> int:
        """Graphs captured so far."""
        return len(self._graphs)

    def fits(self, contexts: Sequence[torch.Tensor]) -> bool:
        """Whether a step over these contexts (a row each) fits a bucket."""
        return (self.failure is None and 0 < len(contexts) <= self.rows[-1]
                and max(len(s) for s in contexts) <= self.lengths[-1])

    def _load(self, columns: Sequence[Sequence[int]], pads: Sequence[int],
              contexts: Sequence[torch.Tensor]) -> tuple[int, int]:
        """A step's inputs copied in, padded to its bucket: each of ``columns`` (a value a
        row) with its ``pads`` value, the context lengths with 1, each row's context slots
        with the spare slot, as the padding rows' are. Returns the bucket (rows, length)."""
        n = len(contexts)
        lengths = [len(s) for s in contexts]
        rows, length = bucket(n, self.rows), bucket(max(lengths), self.lengths)
        context = torch.full((rows, length), self.spare, dtype=torch.long)  # [R, L]
        for b, slots in enumerate(contexts):
            context[b, :lengths[b]] = slots
        inputs = [[*column, *[pad] * (rows - n)]
                  for column, pad in zip([*columns, lengths], [*pads, 1], strict=True)]
        self._rows[:, :rows].copy_(torch.tensor(inputs, dtype=torch.long), non_blocking=True)
        self._context[:rows, :length].copy_(context, non_blocking=True)
        return rows, length

    def _step(self, key: tuple, run: Callable[[], object]) -> None:
        """``run`` replayed from the graph of ``key`` (captured now if new), or run directly
        where graphs are off or this capture failed."""
        self.steps += 1
        if not self.capture:
            run()
            return
        if key not in self._graphs:
            try:
                self._graphs[key] = self._captured(run)
            except RuntimeError as error:  # an op this torch cannot capture: eager from now
                self.failure = f"{type(error).__name__}: {error}"
                warnings.warn(f"capturing {self.what}'s CUDA graph failed ({self.failure}); "
                              f"{self.fallback}", stacklevel=3)
                run()
                return
        self._graphs[key].replay()

    def _captured(self, run: Callable[[], object]) -> torch.cuda.CUDAGraph:
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        return capture_graph(run, self._pool)


class GraphedDecode(BucketGraphs):
    """Decode-only steps of up to ``max_rows`` requests whose contexts hold up to ``max_len``
    tokens, each run from the graph of its bucket (``capture`` False: run directly)."""

    what = "a decode step"
    fallback = "decode steps run eagerly (--enforce-eager says so up front)"

    def __init__(self, runner: ModelRunner, max_rows: int, max_len: int,
                 capture: bool = True) -> None:
        device = runner.model.device
        # a row's inputs: token, position, write slot and expert (then its context length)
        super().__init__(max_rows, max_len, capture, runner.kv.spare_slot, 4, device)
        self.runner = runner
        self.static = StaticDecode(runner, self.lengths[-1])
        # every graph's logits: one buffer, not one a graph (at 32 rows of a 128k vocabulary
        # in bf16, 8 MB each)
        self._logits = torch.empty(self.rows[-1], runner.model.lm_head.out_features,
                                   dtype=runner.model.dtype, device=device)

    def covers(self, chunks: Sequence[RunnerChunk]) -> bool:
        """Whether a decode-only step of these chunks fits a bucket."""
        return self.fits([c.context_slots for c in chunks])

    def __call__(self, chunks: Sequence[RunnerChunk],
                 experts: Sequence[int] | None) -> torch.Tensor:
        """Logits [n, V] of a decode-only step of n chunks (one token each), ``experts``
        each token's routed expert (None: the layers' gates route). The logits are the
        graph's own output: read them before the next step."""
        n = len(chunks)
        columns = ([c.tokens[0] for c in chunks], [c.start for c in chunks],
                   [int(c.context_slots[-1]) for c in chunks],
                   list(experts) if experts is not None else [0] * n)
        rows, length = self._load(columns, (0, 0, self.spare, 0),
                                  [c.context_slots for c in chunks])
        by_gate = experts is None
        self._step((rows, length, by_gate), functools.partial(self._run, rows, length, by_gate))
        return self._logits[:n]

    def _run(self, rows: int, length: int, by_gate: bool) -> None:
        tokens, positions, write, experts, lengths = self._rows[:, :rows]
        self.static(tokens, positions, write, lengths, None if by_gate else experts,
                    self._context[:rows, :length], self._logits[:rows])
