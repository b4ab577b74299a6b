"""Choosing the routing hysteresis a trained model ships with.

Why: a router trained towards the per-token oracle switches experts on small logit margins, and
an expert cache lives on the opposite (results/router_locality-demo.md: the small recipe's
final router phase took next-token expert reuse from 91% to 82%). ``config.router_hysteresis``
keeps a token on its predecessor's expert unless the best logit beats it by more than a margin;
on the demo model a margin lowered held-out perplexity *and* raised reuse
(results/router_hysteresis.md), so the margin is chosen here by quality alone and serving is
left to profit from whatever locality follows.

The rule: among the candidate margins, the lowest mean perplexity over domains (ties: the larger
margin), scored on validation text no round scores and no step trained on: the part of each
domain's train split past the share the training blocks were cut from. A domain whose train
split has nothing left past that share is not scored; when no domain has any, the held-out
windows are used and the report says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from readmoe.analysis.information import reuse_share
from readmoe.data.tokens import pack_blocks
from readmoe.errors import ReadmoeError
from readmoe.eval.perplexity import window_nll


@dataclass
class MarginScore:
    margin: float
    mean_ppl: float
    ppl: dict[str, float]  # per domain
    locality: float  # mean over domains of the share of tokens routed as the token before them


def unseen_train_blocks(corpus, tokenizer, trained_tokens: int, window: int, tokens: int
                        ) -> dict[str, torch.Tensor]:
    """Per domain, `[N, window]` blocks of its train split after its first ``trained_tokens``
    tokens (the most any training block was cut from), at most ``tokens`` of them."""
    skip = -(-trained_tokens // window)  # whole windows, so no block straddles the boundary
    out = {}
    for domain in corpus.domains:
        try:
            blocks = pack_blocks(tokenizer, corpus.documents(domain, "train"), window,
                                 (skip * window) + tokens)
        except ReadmoeError:
            continue
        if blocks.shape[0] > skip:
            out[domain] = blocks[skip:]
    return out


@torch.no_grad()
def score_margins(model, blocks: dict[str, torch.Tensor], margins: Sequence[float]
                  ) -> list[MarginScore]:
    """Perplexity per domain with the model routing itself at each margin, and the router's
    temporal locality on the same blocks; the model's margin is restored afterwards."""
    kept = model.config.router_hysteresis
    device = next(model.parameters()).device
    scores = []
    try:
        for margin in sorted(set(margins)):
            model.config.router_hysteresis = margin
            ppl = {d: window_nll(model, b, desc=f"margin {margin:g} {d}").ppl
                   for d, b in blocks.items()}
            reuse = [reuse_share(model.route(b.to(device))[0].cpu().numpy())
                     for b in blocks.values()]
            scores.append(MarginScore(margin, sum(ppl.values()) / len(ppl), ppl,
                                      sum(reuse) / len(reuse)))
    finally:
        model.config.router_hysteresis = kept
    return scores


def best_margin(scores: Sequence[MarginScore]) -> float:
    """The lowest mean perplexity; on a tie the larger margin (more locality, same quality)."""
    if not scores:
        raise ReadmoeError("no hysteresis margin was scored")
    return min(scores, key=lambda s: (s.mean_ppl, -s.margin)).margin


def choose_margin(model, corpus, tokenizer, *, margins: Sequence[float], trained_tokens: int,
                  window: int, tokens: int, heldout: dict[str, torch.Tensor]) -> dict:
    """Score ``margins`` on unseen train text (else ``heldout``), set the best on ``model``'s
    config and return the report kept in the training log."""
    blocks = unseen_train_blocks(corpus, tokenizer, trained_tokens, window, tokens)
    source = "train split past the training blocks"
    if not blocks:
        blocks, source = heldout, "held-out windows (no train text was left unseen)"
    scores = score_margins(model, blocks, margins)
    chosen = best_margin(scores)
    model.config.router_hysteresis = chosen
    return {"chosen": chosen, "scored_on": source,
            "tokens_per_domain": {d: int(b.numel()) for d, b in blocks.items()},
            "margins": [asdict(s) for s in scores]}
