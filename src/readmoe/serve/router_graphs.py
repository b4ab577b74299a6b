"""The pre-gating router's step replayed from CUDA graphs, one graph per bucket of rows and
context length, as the backbone's decode step is (``graphs.py``).

Why: on a GPU the router's step is about 66 small ops launched from Python after every
decode step (``benchmarks/step_ops.py``), outside the backbone's graph, and its experts must
come back to the host before the next step is planned. On an H100 the ReadME twin decoded at
0.5-0.63x the dense one (``results/gpu/bfloat16/engine_speed.md``; 3.60 against 2.25 ms a
step at batch 1), while the backbone's graph holds only 120 more kernels than the dense
model's, too few for that gap: this step's launches are the likely rest (not yet timed on a
GPU). Replayed from a graph it is one launch and one copy back.

What a graph holds is ``PagedRouter.experts`` on fixed-shape buffers: rows padded up to a
bucket (``row_buckets``), each row's context slots up to a length bucket
(``length_buckets``) with the spare slot, masked past the row's length. A padding row routes
token 0 at position 0: it writes its key and value to the spare slot (which no request owns)
and attends to it alone. Steps past the largest bucket run eagerly. On a CPU (the tests),
``capture`` False runs the same fixed-shape step directly.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from readmoe.serve.graphs import BucketGraphs

if TYPE_CHECKING:
    from readmoe.serve.router_step import PagedRouter


class GraphedRouter(BucketGraphs):
    """``PagedRouter.step`` for up to ``max_rows`` requests whose contexts hold up to
    ``max_len`` tokens, each step run from the graph of its bucket (``capture`` False: run
    directly). ``spare``: a slot of the router's pools that no request owns."""

    what = "the router step"
    fallback = "router steps run eagerly"

    def __init__(self, router: PagedRouter, spare: int, max_rows: int, max_len: int,
                 capture: bool = True) -> None:
        if spare >= router.keys[0].shape[0]:
            raise ValueError(f"spare slot {spare} is past the router's "
                             f"{router.keys[0].shape[0]} slots")
        device = router.keys[0].device
        # a row's inputs: token and the previous token's expert (then its context length)
        super().__init__(max_rows, max_len, capture, spare, 2, device)
        self.router = router
        self._out = torch.zeros(self.rows[-1], dtype=torch.long, device=device)  # experts

    def __call__(self, tokens: Sequence[int], context_slots: Sequence[torch.Tensor],
                 previous: Sequence[int]) -> list[int]:
        """Each token's expert, as ``PagedRouter.step``; its keys and values written."""
        rows, length = self._load((tokens, previous), (0, -1), context_slots)
        self._step((rows, length), functools.partial(self._run, rows, length))
        return self._out[:len(tokens)].tolist()

    def _run(self, rows: int, length: int) -> None:
        tokens, previous, lengths = self._rows[:, :rows]
        self._out[:rows].copy_(self.router.experts(tokens, self._context[:rows, :length],
                                                   lengths, previous))
