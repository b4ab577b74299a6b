"""Capturing the FFN intermediate activation (the input of down_proj) of every layer.

That activation, act(gate(x)) * up(x), is what the paper's channel masks are built from:
a channel with a small mean |activation| contributes little to down_proj's output.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from tqdm import tqdm

from readmoe.errors import ReadmoeError


def down_projections(model) -> list[torch.nn.Module]:
    layers = getattr(getattr(model, "model", model), "layers", None)
    if layers is None:
        raise ReadmoeError("model has no decoder layers (model.model.layers)")
    try:
        return [layer.mlp.down_proj for layer in layers]
    except AttributeError:
        raise ReadmoeError("model's MLP has no down_proj; a gated Llama-family MLP is "
                           "required") from None


@contextmanager
def capture_ffn_inputs(model, sink: Callable[[int, torch.Tensor], None]) -> Iterator[None]:
    """Call `sink(layer, act)` with act = down_proj's input `[batch, seq, I]` on every forward;
    hooks are always removed, also when the forward raises."""
    handles = []
    for index, module in enumerate(down_projections(model)):
        def hook(_module, inputs, index=index):
            sink(index, inputs[0])
        handles.append(module.register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def feed_blocks(model, blocks: torch.Tensor, batch_size: int, desc: str,
                sink: Callable[[int, torch.Tensor], None]) -> None:
    """Run the backbone over ``blocks`` ``[n, T]`` a batch at a time (with progress), handing
    every layer's down_proj input to ``sink`` (``capture_ffn_inputs``)."""
    backbone = getattr(model, "model", model)
    device = next(model.parameters()).device
    with capture_ffn_inputs(model, sink):
        for start in tqdm(range(0, blocks.shape[0], batch_size), desc=desc, unit="batch"):
            backbone(input_ids=blocks[start : start + batch_size].to(device))
