"""Sequential least-squares refit (``readmoe refactor --refit --sequential``): each layer's down
columns fitted on the inputs the carved model itself gives that layer.

Why: the plain refit (``refit.py``) fits every layer on the dense model's activations, but in
the carved model a layer sees the hidden states the carved layers before it produced, errors
included. Fitting layer l on those (layers 0..l-1 already carved and refitted), as GPTQ and
SparseGPT do, lets each layer's fit absorb part of what the earlier ones lost, and its
regressors are those it will meet when served.

How: the statistics' blocks of every domain are run once to the first decoder layer, and their
hidden states ``[n, T, H]`` are carried from layer to layer. At layer l the dense layer runs on
them once, keeping down_proj's input a and the residual stream the FFN adds to; each domain's
second moments (and means) of a give ``refit_layer`` the same joint problem as the plain refit;
the layer is then finished with the refitted columns (residual + carved down of a), each
domain's tokens through its own expert (the oracle routing of an untrained carving: the readme
planner names experts after domains; a prune layer is the same for all), and that becomes layer
l+1's input. Cost: about one forward pass over the statistics' tokens plus the moments, with
those tokens' hidden states and one layer's FFN activations held in memory (6 x 16k tokens:
226 MB and 604 MB at the default model's size).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch
from tqdm import tqdm

from readmoe.errors import ReadmoeError
from readmoe.refactor.hooks import down_projections
from readmoe.refactor.plan import ExpertPlan, LayerPlan
from readmoe.refactor.refit import DEFAULT_DAMP, refit_layer

TARGETS = ("ffn", "layer")


def check_target(target: str) -> None:
    """Refuse a refit target this module does not know, naming the choices."""
    if target not in TARGETS:
        raise ReadmoeError(f"unknown refit target {target!r}; choose one of {', '.join(TARGETS)}")


class _Reached(Exception):
    """Raised by the hook that stops a forward at the first decoder layer."""


def _layers(model) -> torch.nn.ModuleList:
    return getattr(model, "model", model).layers


@torch.no_grad()
def _first_layer_inputs(model, blocks: torch.Tensor, batch_size: int
                        ) -> list[tuple[torch.Tensor, dict]]:
    """Per batch of ``blocks`` ``[n, T]``: the first decoder layer's hidden states ``[B, T, H]``
    and the keyword arguments the model passes every layer (mask, rotary embeddings), caught as
    the model makes them, so no version-specific mask or RoPE code is repeated here."""
    caught: list[tuple[torch.Tensor, dict]] = []

    def catch(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        caught.append((hidden, {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise _Reached

    handle = _layers(model)[0].register_forward_pre_hook(catch, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        for start in range(0, blocks.shape[0], batch_size):
            with contextlib.suppress(_Reached):
                getattr(model, "model", model)(input_ids=blocks[start:start + batch_size]
                                               .to(device), use_cache=False)
    finally:
        handle.remove()
    return caught


def _run_layer(layer, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def carved_down(lp: LayerPlan, shared: torch.Tensor, experts: torch.Tensor, expert: int | None,
                intermediate: int) -> torch.Tensor:
    """The ``[H, I]`` down matrix a token routed to ``expert`` (None: a layer without a routed
    part) sees: the shared and that expert's refitted columns in their dense positions, zeros
    for every channel it drops."""
    down = torch.zeros(shared.shape[0], intermediate, dtype=shared.dtype)
    down.index_add_(1, lp.shared, shared)
    if expert is not None:
        down.index_add_(1, lp.experts[expert], experts[expert])
    return down


def sequential_refit(dense, plan: ExpertPlan, blocks: Mapping[str, torch.Tensor],
                     damp: float = DEFAULT_DAMP, bias: bool = False, batch_size: int = 4,
                     target: str = "ffn"
                     ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[torch.Tensor] | None]:
    """Per layer the refitted (shared ``[H, S]``, experts ``[E, H, R]``) down columns in the dense
    model's dtype and, with ``bias``, the fitted output biases, as ``refit_down_projections``
    returns them; ``blocks`` are each domain's statistics blocks ``[n, T]``.

    ``target`` is what the carved FFN is fitted to: ``ffn``, the dense FFN's output on the same
    (carved) inputs; ``layer``, what the dense model's layer outputs on the dense model's own
    inputs minus the carved residual stream, so the FFN also makes up for the drift the carved
    layers before it left in the residual stream (ZipLM's choice; it carries the dense hidden
    states too, one more forward pass)."""
    check_target(target)
    names = plan.expert_names
    routed = any(lp.expert_size for lp in plan.layers)
    if routed and sorted(names) != sorted(blocks):
        raise ReadmoeError(f"a sequential refit routes each domain's tokens to the expert named "
                           f"after it, but the experts are {names} and the domains "
                           f"{sorted(blocks)}: plan with --method readme, or refit without "
                           "--sequential")
    downs = down_projections(dense)
    intermediate = downs[0].weight.shape[1]
    domains = sorted(blocks)
    counts = {d: blocks[d].numel() for d in domains}
    total = sum(counts.values())
    states = {d: _first_layer_inputs(dense, blocks[d], batch_size) for d in domains}
    dense_states = dict(states) if target == "layer" else None
    result, biases = [], [] if bias else None
    for index, (layer, lp) in enumerate(tqdm(list(zip(_layers(dense), plan.layers, strict=True)),
                                             desc="sequential refit", unit="layer")):
        with torch.no_grad():
            passes = {d: _LayerPass(layer, downs[index], states[d]) for d in domains}
        grams, sums, crosses, target_sums = {}, {}, {}, {}
        for d in domains:
            grams[d], sums[d] = passes[d].moments()
            if dense_states is not None:
                with torch.no_grad():
                    dense_states[d] = [(_run_layer(layer, hidden, kwargs), kwargs)
                                       for hidden, kwargs in dense_states[d]]
                crosses[d], target_sums[d] = passes[d].target_moments(
                    [h for h, _ in dense_states[d]])
        # per routed expert (its domain's tokens), or one entry over every token
        keys = names if lp.expert_size else [None]

        def pooled(values: dict, key: str | None) -> torch.Tensor:
            return (values[key] / counts[key] if key is not None
                    else sum(values.values()) / total)

        moments = [(pooled(grams, k), counts[k] if k else total) for k in keys]
        means = [pooled(sums, k) for k in keys]
        targets = None if dense_states is None else [
            (pooled(crosses, k), pooled(target_sums, k)) for k in keys]
        weight = downs[index].weight
        shared, experts, fitted = refit_layer(weight.detach().cpu(), lp, moments, damp,
                                              means if bias else None, targets)
        result.append((shared.to(weight.dtype), experts.to(weight.dtype)))
        if biases is not None:
            biases.append(fitted.to(weight.dtype))
        for d in domains:
            expert = names.index(d) if lp.expert_size else None
            matrix = carved_down(lp, *result[-1], expert, intermediate).to(weight)
            offset = None if biases is None else biases[-1][expert or 0].to(weight)
            with torch.no_grad():
                states[d] = passes.pop(d).finish(matrix, offset)
    return result, biases


class _LayerPass:
    """One domain's pass of the dense layer over its hidden states, kept for finishing the
    layer later: per batch the layer's output minus its FFN output (the residual stream the
    FFN adds to, ``[B, T, H]``) and the FFN's down_proj input ``[B, T, I]``."""

    def __init__(self, layer, down_proj, batches: list[tuple[torch.Tensor, dict]]) -> None:
        self.kwargs = [kwargs for _, kwargs in batches]
        self.residuals: list[torch.Tensor] = []
        self.inputs: list[torch.Tensor] = []
        caught = []

        def keep(_module, inputs, output):
            caught.append((inputs[0], output))

        handle = down_proj.register_forward_hook(keep)
        try:
            for hidden, kwargs in batches:
                out = _run_layer(layer, hidden, kwargs)
                act, ffn_out = caught.pop()
                self.residuals.append(out - ffn_out)
                self.inputs.append(act)
        finally:
            handle.remove()

    def moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Sums of a a^T ``[I, I]`` and of a ``[I]`` over the domain's tokens (float64)."""
        width = self.inputs[0].shape[-1]
        gram = torch.zeros(width, width, dtype=torch.float64)
        total = torch.zeros(width, dtype=torch.float64)
        for act in self.inputs:
            flat = act.reshape(-1, width).float()  # [B*T, I]
            gram += (flat.T @ flat).double().cpu()
            total += flat.sum(0).double().cpu()
        return gram, total

    def target_moments(self, outputs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """With t = ``outputs`` minus the residual stream (what the FFN should add to reach
        them): sums of a t^T ``[I, H]`` and of t ``[H]`` over the domain's tokens (float64)."""
        width, hidden = self.inputs[0].shape[-1], self.residuals[0].shape[-1]
        cross = torch.zeros(width, hidden, dtype=torch.float64)
        total = torch.zeros(hidden, dtype=torch.float64)
        for act, residual, out in zip(self.inputs, self.residuals, outputs, strict=True):
            wanted = (out - residual).reshape(-1, hidden).float()  # [B*T, H]
            cross += (act.reshape(-1, width).float().T @ wanted).double().cpu()
            total += wanted.sum(0).double().cpu()
        return cross, total

    def finish(self, matrix: torch.Tensor, offset: torch.Tensor | None
               ) -> list[tuple[torch.Tensor, dict]]:
        """The carved layer's outputs: the residual plus ``a @ matrix^T (+ offset)``."""
        return [(residual + torch.nn.functional.linear(act, matrix, offset), kwargs)
                for residual, act, kwargs in zip(self.residuals, self.inputs, self.kwargs,
                                                 strict=True)]
