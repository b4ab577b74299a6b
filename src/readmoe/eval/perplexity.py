"""Held-out perplexity per domain, on fixed non-overlapping windows.

Protocol (the same for every model so numbers compare side by side): each domain's held-out
documents are packed into windows of `window` tokens (see readmoe.data.tokens); each window
is scored independently from an empty context, every position but the first predicting its
next token, so a window contributes `window - 1` scored tokens. At most `max_tokens` tokens
per domain are packed. Perplexity = exp(mean negative log-likelihood over scored tokens).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

ForwardKwargs = Callable[[str, torch.Tensor], dict]


@dataclass
class PerplexityResult:
    ppl: float
    tokens: int
    nll_sum: float

    def as_dict(self) -> dict:
        return {"ppl": self.ppl, "tokens": self.tokens}


@torch.no_grad()
def window_nll(model, blocks: torch.Tensor, batch_size: int = 8,
               extra_kwargs: Callable[[torch.Tensor], dict] | None = None,
               desc: str | None = None) -> PerplexityResult:
    """Sum of next-token NLL over `blocks` ([num_blocks, window]); extra forward kwargs per batch
    (ReadME models take their routing this way)."""
    device = next(model.parameters()).device
    nll_sum, count = 0.0, 0
    starts = range(0, blocks.shape[0], batch_size)
    for start in tqdm(starts, desc=desc, leave=False, disable=desc is None):
        batch = blocks[start : start + batch_size].to(device)  # [B, W]
        kwargs = extra_kwargs(batch) if extra_kwargs else {}
        logits = model(input_ids=batch, **kwargs).logits[:, :-1].float()  # [B, W-1, V]
        targets = batch[:, 1:]  # [B, W-1]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                              reduction="sum")
        nll_sum += float(nll)
        count += targets.numel()
    ppl = math.exp(nll_sum / count) if count else float("nan")
    return PerplexityResult(ppl=ppl, tokens=count, nll_sum=nll_sum)
