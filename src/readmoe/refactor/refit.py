"""Least-squares refit of the kept channels' down projection (``readmoe refactor --refit``).

Slicing keeps each kept channel's down_proj column as it was, so what the dropped channels
added is simply lost. Since the kept activations a_K(x) are exactly the dense ones, the down
columns that best reproduce the dense FFN output y = W a on the calibration tokens are a linear
least-squares problem with a closed form in the second moments G = E[a a^T] (``gram.py``):
the same shapes, the same active width, other values (as OBS-style structured pruning does).

In a ReadME layer the shared columns W_S serve every expert and expert e's columns W_e serve
only its tokens, so one joint problem per layer, over every domain's tokens at once:

    min  sum_e n_e E_e ||W a - W_S a_S - W_e a_e||^2  +  lam ||[W_S, W_1..W_E] - W0||^2

with n_e the tokens of expert e's domain (the readme planner names experts after domains; an
expert without a domain, from cluster or random, is fitted on all tokens), W0 the sliced
columns and lam = damp * mean(diag(A)) (GPTQ's dampening, pulled towards the slice rather than
towards zero, so a channel the data never excites keeps its dense column). The normal matrix is
an arrow: a shared block coupled to each expert's block, experts not to each other.
A prune layer (no routed part) is the same problem with W_S alone over all tokens.

With ``--compensate`` as well, each expert (a prune layer: the layer) also fits an output bias
b_e in the same problem, the constant feature 1 beside its channels: the least-squares version
of FLAP's mean compensation, with the means E_e[a] of the statistics entering the normal
matrix next to the second moments. The bias is pulled towards zero like the columns towards
the slice. Fitting the columns first and adding the mean of the dropped channels afterwards
would count what the refit already recovered twice.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from readmoe.errors import ReadmoeError
from readmoe.refactor.compensation import require_signed_means
from readmoe.refactor.gram import Grams
from readmoe.refactor.plan import ExpertPlan, LayerPlan
from readmoe.refactor.stats import ActivationStats

DEFAULT_DAMP = 0.01


def refit_layer(down: torch.Tensor, lp: LayerPlan, moments: list[tuple[torch.Tensor, float]],
                damp: float = DEFAULT_DAMP, means: list[torch.Tensor] | None = None,
                targets: list[tuple[torch.Tensor, torch.Tensor]] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """New down columns of one layer: shared ``[H, S]`` and experts ``[E, H, R]`` (float64),
    and with ``means`` the fitted output biases (``[E, H]``, or ``[1, H]`` without a routed
    part), else None.

    ``down`` is the dense ``[H, I]`` down_proj; ``moments`` gives per routed expert (one entry
    for a layer without a routed part) its tokens' mean a a^T ``[I, I]`` and their count;
    ``means`` the same tokens' mean a ``[I]``. The fit reproduces the dense FFN's output W a
    on those tokens, or with ``targets`` (per entry the mean a t^T ``[I, H]`` and mean t
    ``[H]``) another output t of theirs (``sequential.py``: what the dense layer outputs)."""
    down = down.double()
    num_experts, size = lp.experts.shape
    blocks = [lp.shared] + ([lp.experts[e] for e in range(num_experts)] if size else [])
    if len(moments) != max(len(blocks) - 1, 1):
        raise ReadmoeError(f"{len(moments)} second moments for a layer of {len(blocks) - 1} "
                           "routed experts")
    if means is not None and len(means) != len(moments):
        raise ReadmoeError(f"{len(means)} mean activations for {len(moments)} second moments")
    if targets is not None and len(targets) != len(moments):
        raise ReadmoeError(f"{len(targets)} target moments for {len(moments)} second moments")
    offsets = [0]
    for block in blocks:
        offsets.append(offsets[-1] + block.numel())
    columns = offsets[-1]
    n = columns + (len(moments) if means is not None else 0)
    a = torch.zeros(n, n, dtype=torch.float64)
    b = torch.zeros(n, down.shape[0], dtype=torch.float64)
    total = sum(count for _, count in moments)
    s = slice(0, offsets[1])
    for e, (gram, count) in enumerate(moments):
        share = count / total
        gram = gram * share

        def rhs(rows: torch.Tensor, gram=gram, e=e, share=share) -> torch.Tensor:  # [len, H]
            if targets is None:
                return gram[rows] @ down.T
            return targets[e][0].double()[rows] * share

        shared_rows = gram[lp.shared]  # [S, I]
        a[s, s] += shared_rows[:, lp.shared]
        b[s] += rhs(lp.shared)
        r = slice(offsets[e + 1], offsets[e + 2]) if size else None
        if size:
            cols = blocks[e + 1]
            expert_rows = gram[cols]  # [R, I]
            a[s, r] = shared_rows[:, cols]
            a[r, s] = a[s, r].T
            a[r, r] = expert_rows[:, cols]
            b[r] = rhs(cols)
        if means is not None:  # the constant feature of this expert's (or layer's) tokens
            mean, i = means[e].double() * share, columns + e  # mean: [I]
            a[s, i] = a[i, s] = mean[lp.shared]
            if size:
                a[r, i] = a[i, r] = mean[blocks[e + 1]]
            a[i, i] = share
            b[i] = down @ mean if targets is None else targets[e][1].double() * share
    start = torch.cat([down[:, block].T for block in blocks]
                      + [torch.zeros(n - columns, down.shape[0], dtype=torch.float64)])
    lam = damp * float(a.diagonal().mean()) if n else 0.0
    a.diagonal().add_(lam)
    solution = torch.cholesky_solve(b + lam * start, torch.linalg.cholesky(a))  # [n, H]
    shared = solution[s].T.contiguous()
    experts = (torch.stack([solution[offsets[e + 1]:offsets[e + 2]].T for e in range(num_experts)])
               if size else torch.zeros(num_experts, down.shape[0], 0, dtype=torch.float64))
    bias = solution[columns:].contiguous() if means is not None else None
    return shared, experts, bias


def refit_down_projections(dense, plan: ExpertPlan, grams: Grams, damp: float = DEFAULT_DAMP,
                           stats: ActivationStats | None = None
                           ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]],
                                      list[torch.Tensor] | None]:
    """Per layer the refitted (shared ``[H, S]``, experts ``[E, H, R]``) down columns, in the
    dense model's dtype, for ``slicing.slice_dense(down=...)``; with ``stats`` (whose signed
    means are of the grams' tokens) also the fitted biases for ``slice_dense``'s ``biases``."""
    if stats is not None:
        require_signed_means(stats, grams.domains)
        overall_mean = stats.token_weighted_mean()  # [L, I]
    total = sum(grams.tokens.values())
    down, biases = [], [] if stats is not None else None
    for index, lp in enumerate(tqdm(plan.layers, desc="refit down_proj", unit="layer")):
        per_domain = {d: grams.layer(d, index) for d in grams.domains}
        overall = sum(per_domain[d] * grams.tokens[d] for d in grams.domains) / total
        names = plan.expert_names if lp.expert_size else [None]
        moments = [(per_domain[name], grams.tokens[name]) if name in per_domain
                   else (overall, total / len(names)) for name in names]
        means = None if stats is None else [
            stats.mean[name][index] if name in per_domain else overall_mean[index]
            for name in names]
        weight = dense.model.layers[index].mlp.down_proj.weight
        shared, experts, bias = refit_layer(weight.detach().cpu(), lp, moments, damp, means)
        down.append((shared.to(weight.dtype), experts.to(weight.dtype)))
        if biases is not None:
            biases.append(bias.to(weight.dtype))
    return down, biases
