"""Routed experts in a slow tier, a bounded fast tier of ``capacity`` experts per layer.

Why: ReadME knows each token's expert before the backbone runs, so a server can keep most
routed experts off the accelerator and bring in only what the scheduled tokens need. The fast
tier's residency is an ``ExpertCache`` driven by a registered eviction policy, the very objects
the simulator runs, and its plans come from the same ``ExpertPlanner``, so the store's hit
counts equal the simulator's on the same accesses. Shared experts and attention stay resident.

Layout (``slots.SlotFormat``): the fast tier holds each expert as the serving runner
computes it (``packed.py``): gate|up fused, ``[in, out]`` on CPU, or with ``--quantize bf16``
the bf16 panels the runner's own matrices use (about half the bytes a load moves). A float32
slot keeps one layout, so 2-48 rows multiply it through ``x @ W`` where a resident expert has
its panels too. The ``ram`` tier keeps every routed expert in the slots' layout (pinned on
CUDA), so a load is one contiguous copy per matrix; the ``file`` tier reads one (layer,
expert) from the model folder's safetensors (``get_slice(name)[e]``, never the whole tensor)
and packs it on the copy engine. Either can sit behind an emulated link of ``bandwidth`` bytes/s
(``link.EmulatedLink``), which lets a CPU-only machine model a PCIe-bound accelerator; results
then say "emulated".

Executing a plan (``begin_step``): with ``prefetch`` every load of the step is issued at once
in plan order, then the next step's speculative loads, and the copy engine works through them
while compute runs; without, each layer's loads are issued when the layer is reached and
compute waits for them (on demand). Compute reads a slot only after its latest load.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from time import perf_counter

import torch
from safetensors import safe_open

from readmoe.errors import ReadmoeError
from readmoe.serve.experts.cache import CacheStats, ExpertCache, LayerPlan, Load
from readmoe.serve.experts.link import EmulatedLink
from readmoe.serve.experts.loader import CopyEngine, CudaCopyEngine, ThreadCopyEngine
from readmoe.serve.experts.plan import CoDesign, ExpertPlanner, StepPlan
from readmoe.serve.experts.policies import EvictionPolicy, make_policy
from readmoe.serve.experts.slots import SlotFormat, slot_tensors
from readmoe.serve.packed import PackedExpert

PARTS = ("gate_proj", "up_proj", "down_proj")
TIERS = ("file", "ram")
_PREFIX = "model.layers."
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "F64": torch.float64}


def expert_name(layer: int, part: str) -> str:
    return f"{_PREFIX}{layer}.mlp.experts.{part}"


def _layer_of(name: str) -> int | None:
    if not name.startswith(_PREFIX):
        return None
    head = name[len(_PREFIX):].split(".", 1)[0]
    return int(head) if head.isdigit() else None


class _FileTier:
    """Reads one expert of one layer from safetensors on each call (one or sharded files)."""

    def __init__(self, folder: Path) -> None:
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (folder / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise ReadmoeError(f"{folder} holds no model.safetensors; the file tier reads a "
                               "ReadME model folder")
        self._handles = {name: safe_open(str(folder / name), framework="pt", device="cpu")
                         for name in files}
        self._file_of = {key: name for name, handle in self._handles.items()
                         for key in handle.keys()}  # noqa: SIM118 (not iterable)
        self.names = list(self._file_of)

    def shape(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        piece = self._handles[self._file_of[name]].get_slice(name)
        return tuple(piece.get_shape()), _DTYPES[piece.get_dtype()]

    def tensor(self, name: str) -> torch.Tensor:
        return self._handles[self._file_of[name]].get_tensor(name)

    def read(self, layer: int, expert: int, form: SlotFormat
             ) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up, down = (self._handles[self._file_of[n]].get_slice(n)[expert]
                          for n in (expert_name(layer, part) for part in PARTS))
        return form.pack(gate, up, down)


class _RamTier:
    """Every routed expert in CPU memory, packed as the slots hold it (pinned when CUDA can
    use it)."""

    def __init__(self, tensors: Callable[[str], torch.Tensor], layers: Sequence[int],
                 form: SlotFormat, pin: bool) -> None:
        self._experts = {}
        for layer in layers:
            parts = form.pack(*(tensors(expert_name(layer, p)).detach().to("cpu")
                                for p in PARTS))
            self._experts[layer] = tuple(t.pin_memory() if pin else t for t in parts)

    def read(self, layer: int, expert: int, form: SlotFormat
             ) -> tuple[torch.Tensor, torch.Tensor]:
        gate_up, down = self._experts[layer]
        return gate_up[expert], down[expert]


class SlotStore:
    """What ``StepAccess`` needs of a store: packed views of fast-tier slots, a copy engine,
    which load brought each expert and filled each slot, the compute position clock and the
    stall time. ``ExpertStore`` and ``stream.DenseStream`` differ only in where slots and
    loads come from (``_source``) and which counters they keep (``_counts``)."""

    device: torch.device
    expert_bytes: tuple[int, ...]
    form: SlotFormat
    num_layers: int
    routed_layers: list[int]
    num_experts: int

    def check_serves(self, model: torch.nn.Module, quantize: str, prefetch: bool,
                     codesign: CoDesign) -> None:
        """Refuse, before the engine builds anything, a store that cannot serve ``model`` as
        asked: another model's experts, another precision than the runner's, or prefetching
        and prediction where no expert is known ahead (a layer-wise router)."""
        config = model.config
        if self.form.bf16 != (quantize == "bf16"):
            raise ReadmoeError(f"the expert store's slots hold {self.form.name} and the "
                               f"runner packs with --quantize {quantize}: build the store with "
                               f"quantize={quantize!r} (the CLI does), one precision for both")
        if config.router_type == "layerwise" and (prefetch or codesign.prefetch_rate
                                                  or codesign.predictor):
            raise ReadmoeError("a layer-wise router knows no expert before its layer runs, so "
                               "its experts cannot be prefetched or predicted ahead: run it "
                               "with prefetch off (--no-prefetch) and no co-design")
        if codesign.prefetch_rate and not prefetch:
            raise ReadmoeError("loading the next step's experts ahead is a prefetch: it needs "
                               "prefetch on")
        routed = [i for i, layer in enumerate(model.model.layers)
                  if layer.mlp.experts is not None]
        if (self.num_layers, self.routed_layers) != (config.num_hidden_layers, routed) or (
                routed and self.num_experts != config.num_experts):
            raise ReadmoeError("the expert store holds another model's experts: build it from "
                               "the served model's folder")

    def _start_copies(self, views: dict[tuple[int, int], PackedExpert],
                      link: EmulatedLink | None) -> None:
        self._views = views
        self._copy: CopyEngine = (CudaCopyEngine(self.device) if self.device.type == "cuda"
                                  else ThreadCopyEngine(link))
        self._ticket: dict[tuple[int, int], int] = {}  # (layer, expert) -> its latest load
        self._slot_ticket: dict[tuple[int, int], int] = {}  # (layer, slot) -> its latest load
        self._position = 0  # routed experts computed so far: the copy engine's clock
        self._stall_s = 0.0

    def _source(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The packed (gate|up, down) a load of ``expert`` of ``layer`` copies."""
        raise NotImplementedError

    @property
    def _counts(self) -> CacheStats:
        raise NotImplementedError

    @property
    def stats(self) -> CacheStats:
        """The counters with the copy engine's load time and compute's stall time."""
        c = self._counts
        return CacheStats(c.hits, c.misses, c.evictions, c.bytes_moved, c.prefetched,
                          c.prefetch_used, self._copy.load_s, self._stall_s)

    def _submit(self, load: Load, after: int | None) -> int:
        view = self._views[load.layer, load.slot]
        async_copy = self.device.type == "cuda"

        def copy() -> None:
            for target, part in zip(slot_tensors(view), self._source(load.layer, load.expert),
                                    strict=True):
                target.copy_(part, non_blocking=async_copy)
        ticket = self._copy.submit(copy, self.expert_bytes[load.layer], after, load.speculative,
                                   self._slot_ticket.get((load.layer, load.slot)))
        self._ticket[load.layer, load.expert] = self._slot_ticket[load.layer, load.slot] = ticket
        return ticket

    def _weights(self, layer: int, slot: int, ticket: int | None) -> PackedExpert:
        """The weights in ``slot`` once load ``ticket`` (the one that brought the expert this
        access computes) is done; the wait counts as stall."""
        if ticket is not None:
            self._stall_s += self._copy.wait(ticket)
        return self._views[layer, slot]

    def close(self) -> None:
        self._copy.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ExpertStore(SlotStore):
    """Routed experts behind a fast tier of ``capacity`` slots per layer (module docstring).

    ``source``: a ReadME model folder, or a state dict (``model.state_dict()``; ram tier only).
    ``policy``: an ``EvictionPolicy`` or a registered name. ``bandwidth`` (bytes/s) adds an
    emulated link (CPU only). ``quantize``: the serving runner's (``slots.SlotFormat``; "bf16":
    the slots, and the ram tier, hold bf16 panels). Use as a context manager, or ``close()``,
    to stop the copy engine.
    """

    def __init__(self, source: str | Path | Mapping[str, torch.Tensor], *, capacity: int,
                 policy: EvictionPolicy | str = "belady", tier: str = "file",
                 bandwidth: float | None = None, device: str | torch.device = "cpu",
                 quantize: str = "none") -> None:
        if tier not in TIERS:
            raise ReadmoeError(f"unknown expert tier {tier!r}; choose one of {TIERS}")
        self.device = torch.device(device)
        if bandwidth is not None and self.device.type == "cuda":
            raise ReadmoeError("an emulated link models a slow copy on a CPU-only machine; on "
                               "CUDA the copies are real: drop --bandwidth")
        self.tier = tier
        self.form = SlotFormat.of(self.device, quantize)  # the runner's layout (packed.py)
        if isinstance(source, Mapping):
            if tier == "file":
                raise ReadmoeError("the file tier reads a model folder; pass its path")
            names, shape_of, tensor = list(source), lambda n: (tuple(source[n].shape),
                                                               source[n].dtype), source.__getitem__
        else:
            files = _FileTier(Path(source))
            names, shape_of, tensor = files.names, files.shape, files.tensor
        layers = {_layer_of(n) for n in names} - {None}
        if not layers:
            raise ReadmoeError("the source holds no model.layers.* weights")
        self.num_layers = max(layers) + 1
        self.routed_layers = sorted(layer for layer in layers
                                    if expert_name(layer, "gate_proj") in names)
        self._tier = files if tier == "file" else _RamTier(
            tensor, self.routed_layers, self.form, pin=self.device.type == "cuda")
        self.link = EmulatedLink(bandwidth) if bandwidth is not None else None
        views: dict[tuple[int, int], PackedExpert] = {}
        expert_bytes = [0] * self.num_layers
        self.num_experts = 0
        for layer in self.routed_layers:
            (experts, size, hidden), dtype = shape_of(expert_name(layer, "gate_proj"))
            self.num_experts = experts
            slots = tuple(torch.empty((capacity, *shape), dtype=self.form.slot_dtype(dtype),
                                      device=self.device)
                          for shape in self.form.slot_shapes(size, hidden))
            expert_bytes[layer] = sum(part[0].nbytes for part in slots)
            for slot in range(capacity):
                views[layer, slot] = self.form.expert(*(part[slot] for part in slots),
                                                      size, hidden)
        self.expert_bytes = tuple(expert_bytes)
        policy = make_policy(policy) if isinstance(policy, str) else policy
        self.cache = ExpertCache(capacity, self.expert_bytes, policy)
        self._start_copies(views, self.link)

    @property
    def capacity(self) -> int:
        return self.cache.capacity

    @property
    def fast_tier_bytes(self) -> int:
        """Bytes of the fast tier's slots: ``capacity`` experts of every routed layer."""
        return self.capacity * sum(self.expert_bytes)

    def describe(self) -> str:
        tier = "safetensors file" if self.tier == "file" else "CPU RAM"
        link = f" + {self.link.describe()}" if self.link else ""
        bf16 = ", bf16 panels" if self.form.bf16 else ""
        return (f"{tier}{link} -> {self.device.type} (capacity {self.capacity} per layer{bf16})")

    def read(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One expert's packed (gate|up, down) from the slow tier, as a load copies it."""
        return self._tier.read(layer, expert, self.form)

    def planner(self, codesign: CoDesign | None = None) -> ExpertPlanner:
        """The planner whose plans this store executes (over its cache)."""
        return ExpertPlanner(self.cache, self.num_layers, self.routed_layers, codesign)

    def begin_step(self, plan: StepPlan, prefetch: bool,
                   plan_layer: Callable[[int, Sequence[int]], LayerPlan] | None = None
                   ) -> StepAccess:
        """Execute ``plan``; ``plan_layer`` plans the layers it leaves out as they run."""
        return StepAccess(self, plan, prefetch, plan_layer)

    def _source(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.read(layer, expert)

    @property
    def _counts(self) -> CacheStats:
        return self.cache.stats


class StepAccess:
    """One step's routed weights for the runner (``layer``), executing a ``StepPlan`` on a store
    (``ExpertStore``, or ``stream.DenseStream``, which keeps the same slot protocol).

    Compute positions: the step's planned layers take consecutive positions from the store's
    clock, one per expert in each layer's compute order; a load's ``after`` index becomes the
    position the copy engine waits for. ``layer`` yields (expert, weights) in plan order and,
    when the caller comes back for the next one, tells the copy engine that one has computed.

    Which load an expert waits for is fixed when its layer's loads are issued: its own load in
    this plan, or for a hit the load that brought it earlier; a prefetch of the same expert for
    the next step, issued later, is not waited for.
    """

    def __init__(self, store: SlotStore, plan: StepPlan, prefetch: bool,
                 plan_layer: Callable[[int, Sequence[int]], LayerPlan] | None) -> None:
        if not plan.layers and plan_layer is None:
            raise ReadmoeError("a step with no planned layers needs plan_layer")
        self.store, self.plan, self.prefetch, self._plan_layer = store, plan, prefetch, plan_layer
        self._offset: dict[int, int] = {}
        position = store._position
        for layer, layer_plan in plan.layers.items():
            self._offset[layer] = position
            position += len(layer_plan.order)
        self._end = position
        self._waits: dict[tuple[int, int], int | None] = {}
        if prefetch:
            for layer_plan in plan.layers.values():
                self._issue(layer_plan)
            for load in plan.speculative:
                self._submit(load)

    def _submit(self, load: Load) -> int:
        after = None if load.after is None else self._offset[load.after[0]] + load.after[1]
        return self.store._submit(load, after)

    def _issue(self, layer_plan: LayerPlan) -> None:
        """Fix what each expert of the layer waits for, then issue the layer's loads."""
        started = perf_counter()
        layer = layer_plan.layer
        for expert in layer_plan.order:
            ticket = self.store._ticket.get((layer, expert))
            if ticket is not None:  # a prefetch this step needs now is urgent
                self.store._copy.promote(ticket)
            self._waits[layer, expert] = ticket
        for load in layer_plan.loads:
            self._waits[layer, load.expert] = self._submit(load)
        if not self.prefetch:
            self.store._stall_s += perf_counter() - started

    def layer(self, layer: int, experts: Sequence[int]) -> Iterator[tuple[int, PackedExpert]]:
        """``layer``'s routed weights of ``experts``, in compute order (module docstring)."""
        layer_plan = self.plan.layers.get(layer)
        if layer_plan is None:
            layer_plan = self._plan_layer(layer, experts)
            self._offset[layer] = self._end
            self._end += len(layer_plan.order)
        if sorted(layer_plan.order) != sorted(set(experts)):
            raise ReadmoeError(f"layer {layer} was planned for experts {sorted(layer_plan.order)}"
                               f", not {sorted(set(experts))}")
        if not self.prefetch or layer not in self.plan.layers:
            self._issue(layer_plan)
        base = self._offset[layer]
        store = self.store
        for index, expert in enumerate(layer_plan.order):
            yield expert, store._weights(layer, layer_plan.slots[expert],
                                         self._waits[layer, expert])
            store._copy.computed(base + index)
        store._position = max(store._position, base + len(layer_plan.order))

    def finish(self) -> None:
        """The step's compute is done: advance the store's clock past every planned layer."""
        self.store._position = max(self.store._position, self._end)
        self.store._copy.computed(self._end - 1)
