"""Held-out perplexity through the serving runner: the weights as served, int8 included.

Why: ``eval.domains`` scores the model object, whose parameters the runner never changes; a
quantized runner computes with its own int8 copies (and a float16 KV cache rounds what
attention reads), so its quality can only be measured by running the text through the runner
itself (every token's logits, ``every_token``). Each window is one prefill chunk routed as the
engine routes a prompt; on the fp32 runner this equals ``eval.domains``' number (tested).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from readmoe.eval.perplexity import PerplexityResult
from readmoe.serve.kv_cache import PagedKVCache, kv_dtype_of
from readmoe.serve.router_step import prompt_experts
from readmoe.serve.runner import ModelRunner, RunnerChunk


@torch.inference_mode()
def served_nll(model, blocks: torch.Tensor, quantize: str = "none",
               block_size: int = 16, kv_dtype: str = "auto") -> PerplexityResult:
    """Next-token NLL of ``blocks`` [n, W] through a ``ModelRunner(model, quantize=...)``
    over a KV cache of ``kv_dtype`` (``kv_cache.KV_DTYPES``)."""
    config = model.config
    window = blocks.shape[1]
    attn = model.model.layers[0].self_attn
    weight = model.model.embed_tokens.weight
    kv = PagedKVCache(config.num_hidden_layers, -(-window // block_size), block_size,
                      config.num_key_value_heads, attn.head_dim,
                      kv_dtype_of(kv_dtype, weight.dtype), weight.device)
    runner = ModelRunner(model, kv, quantize=quantize)
    nll_sum, count = 0.0, 0
    for index, block in enumerate(blocks):
        request = f"window-{index}"
        kv.admit(request, window)
        kv.grow(request, window)
        chunk = RunnerChunk(block.tolist(), 0, kv.slots(request, 0, window), True)
        logits = runner.forward([chunk], prompt_experts(model, block.tolist()),
                                every_token=True)
        targets = block[1:].to(logits.device)
        nll_sum += float(F.cross_entropy(logits[:-1].float(), targets, reduction="sum"))
        count += targets.numel()
        kv.free(request)
    return PerplexityResult(ppl=math.exp(nll_sum / count) if count else float("nan"),
                            tokens=count, nll_sum=nll_sum)
