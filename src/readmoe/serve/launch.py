"""Open an engine on a model spec: the one set-up `bench serve`, `serve`, `generate` and `chat`
share, so each serves a model exactly the same way.

A ReadME folder is served as it is. A dense checkpoint (HF folder, .gguf, built-in name) is
served through the same engine as a ReadME model with one expert whose shared part is the
whole FFN (``dense_as_readme``): slicing every channel into the shared expert is exact, so the
engine's greedy output equals HF ``generate`` on the dense model, and no second engine exists.

Offloading (``capacity``): the model is loaded on the CPU in the requested dtype and placed
with ``place_for_offload`` on the device, so routed experts never reach the accelerator. The
``ram`` tier is built from the loaded model's own expert tensors (already in the requested
dtype; pinned when CUDA is present); the ``file`` tier reads the folder's safetensors, so it
serves only in the dtype they were saved in, and any other is refused with the fix.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from readmoe.errors import ReadmoeError
from readmoe.models.device import Placement
from readmoe.serve.kv_cache import kv_dtype_of
from readmoe.serve.quantized import QUANTIZATIONS, check_quantization

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from readmoe.serve.engine import Engine
    from readmoe.serve.experts import CoDesign


@dataclass(frozen=True)
class EngineOptions:
    """How the engine batches and where routed experts live (the `bench serve` flags)."""

    scheduler: str = "fcfs"
    max_experts: int | None = None
    max_wait: int | None = None
    load_ratio: float | None = None
    decodes_first: bool | None = None  # None: the scheduler's default
    max_batch_tokens: int = 256
    max_seqs: int = 32
    kv_blocks: int = 1024
    block_size: int = 16
    capacity: int | None = None
    cache_policy: str = "belady"
    prefetch: bool = True
    tier: str = "file"
    bandwidth: float | None = None
    predictor: str | None = None
    prefetch_rate: float = 0.0
    step_history: int | None = None  # step reports kept (None: all; a server keeps the last)
    quantize: str = "none"  # "int8": the runner's matrices in int8 (CPU; serve/quantized.py)
    kv_dtype: str = "auto"  # "float16": the KV cache in float16 (serve/kv_cache.py)
    prepack: bool = True  # CPU fp32: oneDNN's prepacked copies for multi-row products
    router_hysteresis: float | None = None  # None: the folder's config.json value
    cuda_graphs: bool = True  # CUDA: decode steps replayed from graphs (serve/graphs.py)

    def validate(self) -> None:
        if self.capacity is None and (self.bandwidth is not None or self.tier != "file"
                                      or self.predictor or self.prefetch_rate):
            raise ReadmoeError("--tier, --bandwidth, --predictor and --prefetch-rate describe "
                               "expert offloading: add --capacity K")
        self.codesign()
        if self.quantize not in QUANTIZATIONS:
            raise ReadmoeError(f"--quantize {self.quantize!r}: choose one of "
                               f"{', '.join(QUANTIZATIONS)}")
        kv_dtype_of(self.kv_dtype, torch.float32)  # a known name, or the error naming them
        if self.capacity is not None and self.capacity < 1:
            raise ReadmoeError(f"--capacity must be at least 1, got {self.capacity}")
        if self.max_seqs < 1 or self.max_batch_tokens < 1:
            raise ReadmoeError("--max-seqs and --max-batch-tokens must be at least 1")
        if self.router_hysteresis is not None and not self.router_hysteresis >= 0:
            raise ReadmoeError(f"--router-hysteresis is a router-logit margin >= 0, got "
                               f"{self.router_hysteresis}")

    def scheduler_options(self) -> dict:
        return {name: value for name, value in (("max_experts", self.max_experts),
                                                ("max_wait", self.max_wait),
                                                ("load_ratio", self.load_ratio),
                                                ("decodes_first", self.decodes_first))
                if value is not None}

    def codesign(self) -> CoDesign:
        from readmoe.serve.experts import CoDesign

        return CoDesign(self.predictor, self.prefetch_rate)


@dataclass
class ServedEngine:
    """An engine with what was needed to build it and what a report says about it."""

    engine: Engine
    tokenizer: PreTrainedTokenizerBase
    spec: str
    placement: Placement
    experts: dict = field(default_factory=dict)

    @property
    def max_model_len(self) -> int:
        """Longest prompt + output one request may have: the model's positions or the KV
        cache, whichever is smaller."""
        kv = self.engine.kv
        positions = getattr(self.engine.model.config, "max_position_embeddings", None)
        total = kv.num_blocks * kv.block_size
        return min(total, positions) if positions else total


def dense_as_readme(dense) -> torch.nn.Module:
    """A dense Llama-family model as a one-expert ReadME model whose shared expert is the
    whole FFN (exact: every channel kept, none routed)."""
    from readmoe.refactor.plan import dense_plan
    from readmoe.refactor.slicing import slice_dense

    config = dense.config
    return slice_dense(dense, dense_plan(getattr(config, "name_or_path", ""),
                                         config.intermediate_size, config.num_hidden_layers,
                                         routed=False))


def load_served_model(spec: str, placement: Placement, *, offload: bool = False):
    """(model, tokenizer) ready for an engine; with ``offload`` the model stays on the CPU
    (``place_for_offload`` moves it)."""
    from readmoe.eval.routing_modes import is_readme
    from readmoe.models import load_model, load_tokenizer

    device = torch.device("cpu") if offload else placement.device
    model = load_model(spec, dtype=placement.dtype, device="cpu")
    if not is_readme(model):
        if offload:
            raise ReadmoeError(f"{spec} is a dense model: it has no routed experts to offload; "
                               "drop --capacity (or serve a ReadME folder)")
        model = dense_as_readme(model)
    return model.to(device).eval(), load_tokenizer(spec)


def _file_dtype_check(folder: Path, placement: Placement) -> None:
    """The file tier copies experts as saved: refuse a dtype they were not saved in."""
    raw = json.loads((folder / "config.json").read_text())
    saved = getattr(torch, str(raw.get("dtype") or raw.get("torch_dtype")), None)
    if isinstance(saved, torch.dtype) and saved != placement.dtype:
        name = str(saved).removeprefix("torch.")
        raise ReadmoeError(f"the file tier streams experts as saved in {folder} ({name}), not "
                           f"{placement.dtype_name}: add --tier ram (experts kept in "
                           f"{placement.dtype_name}) or --dtype {name}")


@contextlib.contextmanager
def open_engine(spec: str, options: EngineOptions, placement: Placement
                ) -> Iterator[ServedEngine]:
    """Load ``spec``, build its expert store (when offloading) and the engine; close the
    store's copy worker on exit."""
    from readmoe.models import resolve_model
    from readmoe.serve.engine import Engine
    from readmoe.serve.experts.store import ExpertStore
    from readmoe.serve.placement import place_for_offload, routed_expert_bytes
    from readmoe.serve.schedulers import make_scheduler
    from readmoe.serve.types import Budget

    options.validate()
    check_quantization(options.quantize, placement.device, placement.dtype)  # before loading
    scheduler = make_scheduler(options.scheduler, **options.scheduler_options())
    offloaded = options.capacity is not None
    model, tokenizer = load_served_model(spec, placement, offload=offloaded)
    if options.router_hysteresis is not None:
        if model.config.router_type != "pregating":
            raise ReadmoeError(f"--router-hysteresis acts on a pre-gating router; {spec} has "
                               f"router_type {model.config.router_type!r}: drop the flag")
        model.config.router_hysteresis = options.router_hysteresis
    store = contextlib.nullcontext()
    experts = {"store": "all routed experts resident",
               "routed_expert_bytes": routed_expert_bytes(model)}
    if offloaded:
        source = resolve_model(spec) if options.tier == "file" else model.state_dict()
        if options.tier == "file":
            _file_dtype_check(source, placement)
        store = ExpertStore(source, capacity=options.capacity, policy=options.cache_policy,
                            tier=options.tier, bandwidth=options.bandwidth,
                            device=placement.device, quantize=options.quantize)
        released = place_for_offload(model, placement.device)
        experts = {"store": store.describe(), "capacity": options.capacity,
                   "cache_policy": options.cache_policy, "prefetch": options.prefetch,
                   "predictor": options.predictor, "prefetch_rate": options.prefetch_rate,
                   "emulated_link": options.bandwidth, "expert_bytes_released": released,
                   "fast_tier_bytes": store.fast_tier_bytes}
    with store:
        engine = Engine(model, tokenizer, scheduler,
                        Budget(options.max_batch_tokens, options.max_seqs),
                        options.kv_blocks, options.block_size,
                        expert_store=store if offloaded else None,
                        prefetch=options.prefetch and offloaded,
                        codesign=options.codesign() if offloaded else None,
                        step_history=options.step_history, quantize=options.quantize,
                        prepack=options.prepack, kv_dtype=options.kv_dtype,
                        cuda_graphs=options.cuda_graphs)
        yield ServedEngine(engine, tokenizer, spec, placement, experts)
