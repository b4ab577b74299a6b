"""Routed experts in a slow tier, a bounded fast tier of ``capacity`` experts per layer.

Why: ReadME knows each token's expert before the backbone runs, so a server can keep most
routed experts off the accelerator and bring in only what the scheduled tokens need. The fast
tier's residency is an ``ExpertCache`` driven by a registered eviction policy, the very objects
the simulator runs, so the store's hit ratios equal the simulator's on the same accesses.
Shared experts and attention stay resident; they are not the store's business.

Slow tiers: ``file`` reads one (layer, expert) on demand from the model folder's safetensors
(``safe_open(...).get_slice(name)[e]``, never the whole tensor); ``ram`` keeps every routed
expert in CPU memory (pinned when CUDA is available, so copies to the device are async DMA).
Either can sit behind an emulated link of ``bandwidth`` bytes/s (``link.EmulatedLink``), which
lets a CPU-only machine model a PCIe-bound accelerator; results then say "emulated".

One access is all the experts one layer of one step needs, at the simulator's time
``step * num_layers + layer``. Within ``capacity`` its experts are resident together while the
layer computes; beyond it the layer computes expert by expert and some loads wait for the
expert they evict (``LayerWeights``), exactly as ``ExpertCache`` accounts it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import asdict, astuple, dataclass
from pathlib import Path
from time import perf_counter

import torch
from safetensors import safe_open

from readmoe.errors import ReadmoeError
from readmoe.serve.experts.cache import ExpertCache
from readmoe.serve.experts.future import FutureUses
from readmoe.serve.experts.link import EmulatedLink
from readmoe.serve.experts.policies import EvictionPolicy, make_policy
from readmoe.serve.experts.prefetch import AsyncLoader

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


@dataclass(frozen=True)
class ExpertWeights:
    gate: torch.Tensor  # [R, H]
    up: torch.Tensor  # [R, H]
    down: torch.Tensor  # [H, R]


@dataclass(frozen=True)
class StoreStats:
    hits: int
    misses: int
    evictions: int
    bytes_moved: int
    load_s: float  # seconds the copy worker spent loading
    stall_s: float  # seconds callers waited for loads

    @property
    def hit_ratio(self) -> float | None:
        return self.hits / (self.hits + self.misses) if self.hits + self.misses else None

    @property
    def hidden_fraction(self) -> float | None:
        """Share of load time that compute did not wait for (0 on demand)."""
        return max(0.0, 1.0 - self.stall_s / self.load_s) if self.load_s > 0 else None

    def since(self, earlier: StoreStats) -> StoreStats:
        """The counters accumulated after ``earlier`` was read."""
        return StoreStats(*(now - then for now, then in zip(astuple(self), astuple(earlier),
                                                              strict=True)))

    def to_dict(self) -> dict:
        return {**asdict(self), "hit_ratio": self.hit_ratio,
                "hidden_fraction": self.hidden_fraction}


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

    def read(self, layer: int, expert: int) -> list[torch.Tensor]:
        return [self._handles[self._file_of[n]].get_slice(n)[expert]
                for n in (expert_name(layer, part) for part in PARTS)]


class _RamTier:
    """Every routed expert in CPU memory, pinned when CUDA can use it."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], pin: bool) -> None:
        self.names = list(tensors)
        self._experts = {}
        for name, tensor in tensors.items():
            if ".mlp.experts." in name:
                host = tensor.detach().to("cpu").contiguous()
                self._experts[name] = host.pin_memory() if pin else host
        self._shapes = {n: (tuple(t.shape), t.dtype) for n, t in self._experts.items()}

    def shape(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        return self._shapes[name]

    def read(self, layer: int, expert: int) -> list[torch.Tensor]:
        return [self._experts[expert_name(layer, part)][expert] for part in PARTS]


class LayerWeights(Mapping[int, ExpertWeights]):
    """One layer's experts for one access, in compute order: its hits, then its misses in load
    order. Indexing an expert waits for its load (views into the fast tier, valid until the
    next access of the layer).

    When an access needs more experts than the layer has slots, some loads must overwrite an
    expert of this same access (the cache's victim); those are issued only when their expert
    is asked for, and the caller must therefore compute the experts in iteration order (every
    victim is earlier in it). Within capacity every load starts at access time.
    """

    def __init__(self, store: ExpertStore, layer: int, order: list[int], slot_for: dict[int, int],
                 started: dict[int, Future], deferred: dict[int, Callable[[], None]]) -> None:
        self._store, self._layer, self._order, self._slot_for = store, layer, order, slot_for
        self.started, self._deferred = started, deferred
        self._then: Callable[[], None] | None = None

    def after_serial_loads(self, then: Callable[[], None]) -> None:
        """Call ``then`` once this access's deferred loads are done (at once if it has none):
        where a prefetcher issues the next layer's loads, so they never hold up a load the
        compute is waiting for."""
        if self._deferred:
            self._then = then
        else:
            then()

    def __iter__(self) -> Iterator[int]:
        return iter(self._order)

    def __len__(self) -> int:
        return len(self._order)

    def __getitem__(self, expert: int) -> ExpertWeights:
        slot = self._slot_for[expert]
        copy = self._deferred.pop(expert, None)
        if copy is not None:
            self._store._load_now(self._layer, expert, copy)
            if not self._deferred and self._then is not None:
                self._then, then = None, self._then
                then()
        elif expert in self.started:
            self._store._wait([self.started.pop(expert)])
        gate, up, down = self._store._slots[self._layer]
        return ExpertWeights(gate[slot], up[slot], down[slot])


class ExpertStore:
    """Routed experts behind a fast tier of ``capacity`` slots per layer (module docstring).

    ``source``: a ReadME model folder, or a state dict (``model.state_dict()``; ram tier only).
    ``policy``: an ``EvictionPolicy`` or a registered name. ``bandwidth`` (bytes/s) adds an
    emulated link. Use as a context manager, or ``close()``, to stop the copy worker.
    """

    def __init__(self, source: str | Path | Mapping[str, torch.Tensor], *, capacity: int,
                 policy: EvictionPolicy | str = "belady", tier: str = "file",
                 bandwidth: float | None = None, device: str | torch.device = "cpu") -> None:
        if tier not in TIERS:
            raise ReadmoeError(f"unknown expert tier {tier!r}; choose one of {TIERS}")
        self.device = torch.device(device)
        self.tier = tier
        if isinstance(source, Mapping):
            if tier == "file":
                raise ReadmoeError("the file tier reads a model folder; pass its path")
            self._tier = _RamTier(source, pin=torch.cuda.is_available())
        else:
            files = _FileTier(Path(source))
            self._tier = files if tier == "file" else _RamTier(
                {n: files._handles[files._file_of[n]].get_tensor(n) for n in files.names
                 if ".mlp.experts." in n}, pin=torch.cuda.is_available())
            self._tier.names = files.names
        layers = {_layer_of(n) for n in self._tier.names} - {None}
        if not layers:
            raise ReadmoeError("the source holds no model.layers.* weights")
        self.num_layers = max(layers) + 1
        self.routed_layers = sorted(layer for layer in layers
                                    if expert_name(layer, "gate_proj") in self._tier.names)
        self.link = EmulatedLink(bandwidth) if bandwidth is not None else None
        self._slots: dict[int, list[torch.Tensor]] = {}
        expert_bytes = [0] * self.num_layers
        for layer in self.routed_layers:
            buffers = []
            for part in PARTS:
                shape, dtype = self._tier.shape(expert_name(layer, part))
                buffers.append(torch.empty((capacity, *shape[1:]), dtype=dtype,
                                           device=self.device))
                expert_bytes[layer] += buffers[-1][0].numel() * buffers[-1].element_size()
            self.num_experts = shape[0]
            self._slots[layer] = buffers
        self.expert_bytes = tuple(expert_bytes)
        policy = make_policy(policy) if isinstance(policy, str) else policy
        self.cache = ExpertCache(capacity, self.expert_bytes, policy)
        self._slot_of: dict[int, dict[int, int]] = {layer: {} for layer in self.routed_layers}
        self._pending: dict[int, tuple[int, tuple[int, ...], LayerWeights]] = {}
        self._loader = AsyncLoader(self.device, self.link)
        self._stall_s = 0.0

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
        return f"{tier}{link} -> {self.device.type} (capacity {self.capacity} per layer)"

    @property
    def stats(self) -> StoreStats:
        c = self.cache.stats
        return StoreStats(hits=c.hits, misses=c.misses, evictions=c.evictions,
                          bytes_moved=c.bytes_moved, load_s=self._loader.load_s,
                          stall_s=self._stall_s)

    def _access(self, layer: int, experts: tuple[int, ...], time: int,
                future: FutureUses) -> LayerWeights:
        """Cache bookkeeping for one access; queue the loads that may start now."""
        if layer not in self._slot_of:
            raise ReadmoeError(f"layer {layer} has no routed experts")
        if layer in self._pending:
            raise ReadmoeError(f"layer {layer} has a prefetched access not yet taken")
        slot_of = self._slot_of[layer]
        loads = self.cache.access_loads([(layer, e) for e in experts], time, future)
        missed = [expert for (_, expert), _ in loads]
        hits = [e for e in experts if e not in missed]
        slot_for = {e: slot_of[e] for e in hits}
        free = sorted(set(range(self.capacity)) - set(slot_of.values()))
        started, deferred = {}, {}
        for (_, expert), victim in loads:
            slot = free.pop(0) if victim is None else slot_of.pop(victim[1])
            slot_of[expert] = slot_for[expert] = slot
            copy = self._copier(layer, expert, slot)
            if victim is not None and victim[1] in experts:
                deferred[expert] = copy  # its slot holds an expert of this access, not yet used
            else:
                started[expert] = self._loader.submit((layer, expert), copy,
                                                      self.expert_bytes[layer])
        return LayerWeights(self, layer, hits + missed, slot_for, started, deferred)

    def _copier(self, layer: int, expert: int, slot: int):
        async_copy = self.device.type == "cuda"

        def copy() -> None:
            for buffer, host in zip(self._slots[layer], self._tier.read(layer, expert),
                                    strict=True):
                buffer[slot].copy_(host, non_blocking=async_copy)
        return copy

    def _load_now(self, layer: int, expert: int, copy) -> None:
        """Issue a deferred load and wait for it (the caller stalls for all of it)."""
        started = perf_counter()
        self._loader.wait([self._loader.submit((layer, expert), copy, self.expert_bytes[layer],
                                               urgent=True)])
        self._stall_s += perf_counter() - started

    def _wait(self, futures: Sequence[Future]) -> None:
        self._stall_s += self._loader.wait(futures)

    def prefetch(self, layer: int, experts: Sequence[int], time: int,
                 future: FutureUses) -> None:
        """Access ``layer`` now and start loading its misses in the background."""
        needed = tuple(sorted(set(experts)))
        self._pending[layer] = (time, needed, self._access(layer, needed, time, future))

    def experts_for(self, layer: int, experts: Sequence[int], time: int,
                    future: FutureUses) -> LayerWeights:
        """The weights of ``experts`` at ``layer`` (see ``LayerWeights``): prefetched by
        ``prefetch``, or accessed now, on demand."""
        needed = tuple(sorted(set(experts)))
        pending = self._pending.pop(layer, None)
        if pending is None:  # on demand: the caller waits for the whole load, issue included
            started = perf_counter()
            weights = self._access(layer, needed, time, future)
            self._loader.wait(weights.started.values())
            self._stall_s += perf_counter() - started
            return weights
        if pending[:2] != (time, needed):
            raise ReadmoeError(f"layer {layer} was prefetched for experts {pending[1]} at time "
                               f"{pending[0]}, not {needed} at {time}")
        return pending[2]

    def close(self) -> None:
        self._loader.close()

    def __enter__(self) -> ExpertStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
