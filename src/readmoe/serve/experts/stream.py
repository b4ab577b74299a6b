"""The dense baseline at a memory budget: FFN weights streamed layer by layer.

Why: a user without an MoE who must fit a model into less accelerator memory than its FFNs
need keeps as many layers' FFNs resident as fit and streams the others through a pair of
buffers every step (what offloading frameworks such as accelerate's do, with prefetch). It is
the baseline ReadME's expert cache is measured against at equal fast-memory bytes.

The model is the dense one as a single routed expert holding the whole FFN
(``refactor.plan.dense_plan``), so it runs on the same engine and runner. With a budget of
``B`` bytes and ``F`` bytes per layer's FFN: if all layers fit, all are resident; otherwise two
buffers (``2F``) are set aside and ``k = (B - 2F) // F`` layers stay resident, the streamed
ones spread evenly over the depth so each load has the most compute before it to hide behind.

``StreamPlanner`` makes each step's ``StepPlan`` (the same plan type the expert cache's planner
makes, so the store's ``StepAccess`` and the simulator's timeline execute it unchanged):
resident layers load on first use (a cold start, as an empty expert cache has); the i-th
streamed layer loads into buffer ``i % 2`` every step, after the streamed layer two before it
has computed. Counters use ``CacheStats``: a resident layer's access is a hit once loaded, a
streamed layer's access is always a miss.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from readmoe.errors import ReadmoeError
from readmoe.serve.experts.cache import CacheStats, LayerPlan, Load
from readmoe.serve.experts.future import access_time
from readmoe.serve.experts.link import EmulatedLink
from readmoe.serve.experts.plan import CoDesign, StepPlan
from readmoe.serve.experts.slots import SlotFormat
from readmoe.serve.experts.store import (
    PARTS,
    SlotStore,
    StepAccess,
    _FileTier,
    expert_name,
)
from readmoe.serve.packed import PackedExpert
from readmoe.serve.types import Batch, CacheView, Request


def streamed_layers(num_layers: int, resident: int) -> list[int]:
    """The layers to stream when ``resident`` of ``num_layers`` stay, spread evenly."""
    count = num_layers - max(0, min(resident, num_layers))
    return sorted({(2 * i + 1) * num_layers // (2 * count) for i in range(count)}) if count else []


def split_budget(num_layers: int, layer_bytes: int, budget_bytes: int) -> int:
    """How many layers' FFNs stay resident under ``budget_bytes`` (module docstring)."""
    if budget_bytes >= num_layers * layer_bytes:
        return num_layers
    if budget_bytes < 2 * layer_bytes:
        raise ReadmoeError(f"a budget of {budget_bytes} bytes holds less than the two "
                           f"streaming buffers ({2 * layer_bytes} bytes)")
    return (budget_bytes - 2 * layer_bytes) // layer_bytes


class StreamPlanner:
    """Plans steps of the dense stream over ``layers`` (those with an FFN), ``resident`` of
    them kept; the engine and the simulator call it like an ``ExpertPlanner``."""

    def __init__(self, num_layers: int, layers: Sequence[int], resident: int,
                 expert_bytes: Sequence[int]) -> None:
        self.num_layers = num_layers
        self.layers = list(layers)
        self.streamed = [self.layers[i] for i in streamed_layers(len(self.layers), resident)]
        self.expert_bytes = tuple(expert_bytes)
        self.stats = CacheStats()
        self._loaded: set[int] = set()

    def view(self) -> CacheView | None:
        return None

    def slot(self, layer: int) -> int:
        """A resident layer's own slot 0; a streamed layer's buffer (0 or 1)."""
        return self.streamed.index(layer) % 2 if layer in self.streamed else 0

    def plan(self, step: int, batch: Batch | None = None, queued: Sequence[Request] = (),
             tokens_per_step: int = 0, lookahead: Mapping | None = None) -> StepPlan:
        layers = {}
        for layer in self.layers:
            loads: tuple[Load, ...] = ()
            if layer in self.streamed:
                index = self.streamed.index(layer)
                before = (self.streamed[index - 2], 0) if index >= 2 else None
                loads = (Load(layer, 0, self.slot(layer), before),)
                self.stats.misses += 1
            elif layer not in self._loaded:
                loads = (Load(layer, 0, 0),)
                self.stats.misses += 1
                self._loaded.add(layer)
            else:
                self.stats.hits += 1
            self.stats.bytes_moved += len(loads) * self.expert_bytes[layer]
            layers[layer] = LayerPlan(layer, access_time(step, layer, self.num_layers), (0,),
                                      {0: self.slot(layer)}, loads)
        return StepPlan(step, layers)


class DenseStream(SlotStore):
    """A dense model's FFNs behind a budget of ``budget_bytes`` (module docstring).

    ``folder`` is a dense-as-one-expert model folder. It speaks the store protocol the engine
    and ``StepAccess`` use (``planner``, ``begin_step``, ``stats``, ``describe``,
    ``fast_tier_bytes``, ``close``); a streamed layer's two slots are the shared buffers.
    """

    def __init__(self, folder: str | Path, budget_bytes: int, *, bandwidth: float | None = None,
                 device: str | torch.device = "cpu", quantize: str = "none") -> None:
        files = _FileTier(Path(folder))
        self.device = torch.device(device)
        if bandwidth is not None and self.device.type == "cuda":
            raise ReadmoeError("an emulated link is for CPU-only machines: drop --bandwidth")
        self.form = SlotFormat.of(self.device, quantize)
        layers = sorted({int(n.split(".")[2]) for n in files.names
                         if n.startswith("model.layers.") and ".mlp.experts." in n})
        if not layers:
            raise ReadmoeError(f"{folder} has no FFN stored as routed experts: write it with "
                               "refactor.pipeline.write_dense_experts")
        (experts, size, hidden), _ = files.shape(expert_name(layers[0], "gate_proj"))
        if experts != 1:
            raise ReadmoeError(f"{folder} has {experts} routed experts; streaming the dense "
                               "baseline needs one expert holding the whole FFN")
        self.num_layers, self.routed_layers, self.num_experts = max(layers) + 1, layers, 1
        pin = self.device.type == "cuda"
        self._host = {}
        for layer in layers:
            parts = self.form.pack(*(files.tensor(expert_name(layer, p))[0] for p in PARTS))
            self._host[layer] = tuple(t.pin_memory() if pin else t for t in parts)
        gate_up, down = self._host[layers[0]]
        self.layer_bytes = gate_up.nbytes + down.nbytes
        self.expert_bytes = tuple(self.layer_bytes if layer in layers else 0
                                  for layer in range(self.num_layers))
        resident = split_budget(len(layers), self.layer_bytes, budget_bytes)
        self._planner = StreamPlanner(self.num_layers, layers, resident, self.expert_bytes)
        self.streamed = self._planner.streamed

        def empty() -> PackedExpert:
            return self.form.expert(*(torch.empty_like(t, device=self.device)
                                      for t in (gate_up, down)), size, hidden)
        ring = [empty(), empty()] if self.streamed else []
        views = {(layer, 0): empty() for layer in layers if layer not in self.streamed}
        for index, layer in enumerate(self.streamed):
            views[layer, index % 2] = ring[index % 2]
        self.link = EmulatedLink(bandwidth) if bandwidth is not None else None
        self._start_copies(views, self.link)

    def check_serves(self, model: torch.nn.Module, quantize: str, prefetch: bool,
                     codesign: CoDesign) -> None:
        if codesign.predictor or codesign.prefetch_rate:
            raise ReadmoeError("a dense stream has no experts to predict: serve it without "
                               "co-design options")
        super().check_serves(model, quantize, prefetch, codesign)

    @property
    def fast_tier_bytes(self) -> int:
        """Bytes of FFN weights on the fast tier: resident layers plus the two buffers."""
        resident = len(self.routed_layers) - len(self.streamed)
        return (resident + (2 if self.streamed else 0)) * self.layer_bytes

    def describe(self) -> str:
        link = f" + {self.link.describe()}" if self.link else ""
        return (f"dense FFN stream: CPU RAM{link} -> {self.device.type} "
                f"({len(self.routed_layers) - len(self.streamed)} layers resident, "
                f"{len(self.streamed)} streamed{', bf16 panels' if self.form.bf16 else ''})")

    @property
    def _counts(self) -> CacheStats:
        return self._planner.stats

    def planner(self, codesign: object = None) -> StreamPlanner:
        return self._planner

    def begin_step(self, plan: StepPlan, prefetch: bool, plan_layer: object = None
                   ) -> StepAccess:
        return StepAccess(self, plan, prefetch, None)

    def _source(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._host[layer]
