"""The serving systems compared at equal fast-memory budget, runnable on the engine and on the
simulator from one definition each.

Why: the co-design claim is comparative (what the router's foresight buys over the systems a
user would otherwise run), so every system is named here once, with what it may use, and both
the real engine (``run_engine``) and the simulator (``sim_config``) are configured from it.

Budget: the fast-memory bytes for routed experts as a share of all routed-expert bytes of the
ReadME model (shared experts, attention and embeddings stay resident, counted apart); an
expert cache of the same share holds ``round(share * E)`` experts per layer; the dense stream
gets the same bytes for its FFN weights.

- ``readme-codesign``: everything the pre-gating router allows: the cache-aware scheduler
  (capped at the cache's capacity, ``load_ratio`` from the setting's load and step times),
  Belady over the known and the predicted future (a next-expert rule: by default the most
  frequent of the request's last 5 experts, the most accurate of the rules measured on the
  default model's held-out routing; benchmarks/codesign.py measures and picks again), and
  prefetch: every load of a step issued at its start, and experts loaded ahead for the next
  step from the predicted demand at ``prefetch_rate`` per step, what the copy stream can load
  during one step's compute, where loading ahead can pay at all (``speculation_pays``).
- ``readme-codesign-on-demand``: the same choices, loads issued when each layer is reached and
  nothing loaded ahead (what prefetching adds, measured apart).
- ``readme-lru``: the same model with no foresight used: FCFS, LRU, on demand.
- ``layerwise-lru``: the layer-wise-router MoE on the same experts, FCFS, LRU, on demand: it
  cannot know a layer's experts before the layer runs (what mixtral-offloading does).
- ``dense-stream``: the dense model, its FFNs streamed through the budget
  (``experts/stream.py``), FCFS, prefetch.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from readmoe.errors import ReadmoeError
from readmoe.serve.cost import CostModel
from readmoe.serve.engine import Engine
from readmoe.serve.experts import CoDesign
from readmoe.serve.experts.store import ExpertStore
from readmoe.serve.experts.stream import DenseStream
from readmoe.serve.schedulers import make_scheduler
from readmoe.serve.sim import SimConfig
from readmoe.serve.types import Budget
from readmoe.serve.workload import RequestSpec

SYSTEMS = ("readme-codesign", "readme-codesign-on-demand", "readme-lru", "layerwise-lru",
           "dense-stream")
MODELS = {"readme-codesign": "readme", "readme-codesign-on-demand": "readme",
          "readme-lru": "readme", "layerwise-lru": "layerwise", "dense-stream": "dense"}


@dataclass(frozen=True)
class Setting:
    """Where the routed experts live: the slow tier, the emulated link (bytes/s or None), the
    ratio of loading one expert into every routed layer to one step's compute
    (``load_ratio``), and how many experts the copy stream can load during one step
    (``prefetch_rate``, its inverse)."""

    label: str
    tier: str = "ram"
    bandwidth: float | None = None
    load_ratio: float = 1.0
    prefetch_rate: float = 1.0


@dataclass(frozen=True)
class System:
    name: str
    scheduler: str
    scheduler_options: dict = field(default_factory=dict)
    policy: str = "lru"
    prefetch: bool = False
    codesign: CoDesign = CoDesign()

    @property
    def model(self) -> str:
        return MODELS[self.name]


def capacity_for(share: float, num_experts: int) -> int:
    """Experts per layer a budget of ``share`` of the routed-expert bytes holds (at least 1)."""
    if not 0 < share <= 1:
        raise ReadmoeError(f"a memory budget is a share in (0, 1], got {share}")
    return max(1, min(num_experts, round(share * num_experts)))


def speculation_pays(setting: Setting, capacity: int, num_experts: int) -> bool:
    """Whether loading experts ahead for the next step can hide anything in ``setting``.

    A step's own loads are issued at its start and run beside its compute, so they stall
    nothing once all of them fit in one step's compute. A step misses at most the
    ``num_experts - capacity`` experts a full cache lacks, each costing ``load_ratio`` step
    times of copying, so when ``(num_experts - capacity) * load_ratio <= 1`` (copies within
    RAM: 4 * 0.07 at 2 of 6 experts, measured) there is nothing left for speculation to hide,
    and speculative copies only add memory traffic beside compute and, on a wrong guess,
    evict an expert the next step wanted (measured: 192 vs 160 ms per token from RAM at 4 of
    6 experts). Behind a slow link (load_ratio about 1) or PCIe (about 7) it is on.
    """
    return (num_experts - capacity) * setting.load_ratio > 1


def make_system(name: str, setting: Setting, predictor: str = "mode-5",
                capacity: int | None = None, num_experts: int | None = None) -> System:
    """The system ``name`` (module docstring) for ``setting``; ``predictor`` is the co-design's
    next-expert rule (``experts/predict.py``). With ``capacity`` (experts per layer the budget
    holds) and ``num_experts``, ``readme-codesign`` loads ahead only where that can pay
    (``speculation_pays``); without them it always does."""
    if name in ("readme-codesign", "readme-codesign-on-demand"):
        ahead = name == "readme-codesign"
        rate = setting.prefetch_rate if ahead else 0.0
        if rate and capacity is not None and num_experts is not None and not speculation_pays(
                setting, capacity, num_experts):
            rate = 0.0
        return System(name, "cache-aware", {"load_ratio": setting.load_ratio}, "belady",
                      prefetch=ahead, codesign=CoDesign(predictor, rate))
    if name in ("readme-lru", "layerwise-lru"):
        return System(name, "fcfs")
    if name == "dense-stream":
        return System(name, "fcfs", prefetch=True)
    raise ReadmoeError(f"unknown system {name!r}; choose one of {', '.join(SYSTEMS)}")


def run_engine(system: System, model: torch.nn.Module, tokenizer, folder: str, *,
               specs: Sequence[RequestSpec], share: float, setting: Setting,
               routed_bytes: int, budget: Budget, kv_blocks: int, block_size: int = 16,
               quantize: str = "none") -> dict:
    """Serve ``specs`` on the engine as ``system`` at ``share`` of ``routed_bytes``; ``model``
    (of ``folder``) must have been placed for offload; ``quantize``: the runner's and the
    store's (bf16: ``routed_bytes`` in bf16 panels too). Returns the engine's metrics plus what
    produced them, and the realised per-step accesses (``steps``: each step's experts and its
    tokens' experts in batch order)."""
    if system.model == "dense":
        store = DenseStream(folder, math.floor(share * routed_bytes),
                            bandwidth=setting.bandwidth, quantize=quantize)
    else:
        store = ExpertStore(folder, capacity=capacity_for(share, model.config.num_experts),
                            policy=system.policy, tier=setting.tier,
                            bandwidth=setting.bandwidth, quantize=quantize)
    with store:
        engine = Engine(model, tokenizer, make_scheduler(system.scheduler,
                                                          **system.scheduler_options),
                        budget, kv_blocks, block_size, expert_store=store,
                        prefetch=system.prefetch, codesign=system.codesign, quantize=quantize)
        metrics = engine.run_workload(specs)
        metrics["store"] = store.describe()
        metrics["fast_tier_bytes"] = store.fast_tier_bytes
        metrics["steps_detail"] = [{"experts": list(s.experts),
                                    "tokens": list(s.token_experts)} for s in engine.steps]
    return metrics


def sim_config(system: System, share: float, setting: Setting, cost: CostModel,
               num_experts: int, budget: Budget, routed_bytes: int, seed: int = 0) -> SimConfig:
    """The simulator's configuration of ``system`` (the dense stream's cost model is the
    caller's: pass the dense profile as ``cost``)."""
    common = {"scheduler": system.scheduler, "scheduler_options": system.scheduler_options,
              "budget": budget, "cost": cost, "prefetch": system.prefetch,
              "codesign": system.codesign, "seed": seed}
    if system.model == "dense":
        return SimConfig(**common, stream_budget=math.floor(share * routed_bytes))
    return SimConfig(**common, policy=system.policy,
                     capacity=capacity_for(share, num_experts),
                     router="layer-wise" if system.model == "layerwise" else "pre-gating")


def calibrate(model: torch.nn.Module, tokenizer, folder: str | Path, specs: Sequence[RequestSpec],
              budget: Budget, kv_blocks: int = 2048, quantize: str = "none") -> dict:
    """What the settings derive from, measured: the resident engine's mean step time on
    ``specs``, one routed expert's bytes, and the seconds to copy it within RAM (the runner's
    and the store's precision: ``quantize``)."""
    engine = Engine(model, tokenizer, "fcfs", budget, kv_blocks=kv_blocks, quantize=quantize)
    engine.run_workload(specs)
    step_s = statistics.mean(s.end_time - s.start_time for s in engine.steps)
    layers = model.config.num_hidden_layers
    with ExpertStore(folder, capacity=1, tier="ram", quantize=quantize) as store:
        expert_bytes = max(store.expert_bytes)
        source = store.read(store.routed_layers[0], 0)
    slot = [torch.empty_like(t) for t in source]
    times = []
    for _ in range(30):
        started = time.perf_counter()
        for dst, src in zip(slot, source, strict=True):
            dst.copy_(src)
        times.append(time.perf_counter() - started)
    return {"step_s": step_s, "layer_s": step_s / layers, "expert_bytes": expert_bytes,
            "ram_copy_s": statistics.median(times),
            "link_bandwidth": expert_bytes * layers / step_s, "layers": layers}


def make_settings(calibration: dict, names: Sequence[str],
                  link_bandwidth: float | None = None) -> dict[str, Setting]:
    """``ram`` (copies within RAM) and ``link`` (the RAM tier behind an emulated link at which
    one expert of one layer loads in one layer's compute, or of ``link_bandwidth`` bytes/s: one
    link for runs that differ in what they move), with their load ratio and prefetch rate from
    ``calibration``."""
    layers, step_s = calibration["layers"], calibration["step_s"]
    result = {}
    for name in names:
        if name not in ("ram", "link"):
            raise ReadmoeError(f"unknown setting {name!r}; choose 'ram' or 'link'")
        bandwidth = (link_bandwidth or calibration["link_bandwidth"]) if name == "link" else None
        load_s = calibration["ram_copy_s"] + (calibration["expert_bytes"] / bandwidth
                                              if bandwidth else 0.0)
        ratio = layers * load_s / step_s
        result[name] = Setting(name, "ram", bandwidth, round(ratio, 3), round(1 / ratio, 3))
    return result
