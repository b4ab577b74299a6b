"""The expert plan: which FFN channels of the dense model form each expert, per layer.

A plan is the hand-off between planning and slicing, stored as two files in a folder:

- ``plan.json``: method, channel-importance criterion (``importance``; plans written before
  it existed used ``activation``), source model, expert names, keep fraction, dense
  intermediate size, and a per-layer summary (shared size, expert size, overlap matrix
  between experts);
- ``plan.safetensors``: ``shared.{l}`` (int64 ``[S_l]``, sorted channel indices) and
  ``experts.{l}`` (int64 ``[E, R_l]``, each row sorted) for every layer ``l``.

Within a layer every routed expert has the same size ``R_l`` (the paper's domain mask minus
the shared set), so experts stack as ``[E, R_l, H]`` tensors. ``R_l`` may be 0 (the `prune`
baseline, or a plan whose shared set is the whole FFN): then the layer has no routed part.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from readmoe.errors import ReadmoeError
from readmoe.io import atomic_save_safetensors, atomic_write_text

PLAN_JSON = "plan.json"
PLAN_TENSORS = "plan.safetensors"


@dataclass
class LayerPlan:
    shared: torch.Tensor  # [S] int64, sorted
    experts: torch.Tensor  # [E, R] int64, rows sorted

    @property
    def shared_size(self) -> int:
        return int(self.shared.numel())

    @property
    def expert_size(self) -> int:
        return int(self.experts.shape[1])

    def overlap(self) -> list[list[float]]:
        """Fraction of expert i's channels that expert j also holds (1.0 on the diagonal)."""
        num_experts, size = self.experts.shape
        if size == 0:
            return [[1.0] * num_experts for _ in range(num_experts)]
        rows = []
        for i in range(num_experts):
            a = set(self.experts[i].tolist())
            rows.append([len(a.intersection(self.experts[j].tolist())) / size
                         for j in range(num_experts)])
        return rows


@dataclass
class ExpertPlan:
    method: str
    model: str
    expert_names: list[str]
    intermediate_size: int
    keep: float
    layers: list[LayerPlan]
    meta: dict = field(default_factory=dict)
    importance: str = "activation"  # how channels were ranked (refactor/importance.py)

    @property
    def num_experts(self) -> int:
        return len(self.expert_names)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def active_sizes(self) -> list[int]:
        """Channels one token uses per layer: shared plus one routed expert."""
        return [lp.shared_size + lp.expert_size for lp in self.layers]

    def validate(self) -> None:
        """Check the invariants slicing relies on; raise ReadmoeError on the first broken one."""
        size = self.intermediate_size
        for index, lp in enumerate(self.layers):
            where = f"plan layer {index}"
            if lp.shared.dtype != torch.int64 or lp.experts.dtype != torch.int64:
                raise ReadmoeError(f"{where}: channel indices must be int64")
            if lp.experts.dim() != 2 or lp.experts.shape[0] != self.num_experts:
                raise ReadmoeError(
                    f"{where}: experts tensor has shape {tuple(lp.experts.shape)}, "
                    f"expected [{self.num_experts}, R]")
            channels = torch.cat([lp.shared, lp.experts.flatten()])
            if channels.numel() and (int(channels.min()) < 0 or int(channels.max()) >= size):
                raise ReadmoeError(f"{where}: channel index outside [0, {size})")
            if lp.shared.unique().numel() != lp.shared.numel():
                raise ReadmoeError(f"{where}: shared set repeats a channel")
            if not torch.equal(lp.shared, lp.shared.sort().values):
                raise ReadmoeError(f"{where}: shared channels must be sorted")
            shared = set(lp.shared.tolist())
            for e in range(self.num_experts):
                row = lp.experts[e]
                if row.unique().numel() != row.numel():
                    raise ReadmoeError(f"{where}: expert {e} repeats a channel")
                if not torch.equal(row, row.sort().values):
                    raise ReadmoeError(f"{where}: expert {e} channels must be sorted")
                if shared.intersection(row.tolist()):
                    raise ReadmoeError(f"{where}: expert {e} holds shared channels "
                                       "(shared channels are stored once, never per expert)")
            if lp.shared_size + lp.expert_size == 0:
                raise ReadmoeError(f"{where}: no channel is active (shared and experts empty)")

    def summary(self) -> dict:
        return {
            "method": self.method,
            "importance": self.importance,
            "model": self.model,
            "expert_names": self.expert_names,
            "num_experts": self.num_experts,
            "intermediate_size": self.intermediate_size,
            "keep": self.keep,
            "meta": self.meta,
            "layers": [
                {"shared_size": lp.shared_size, "expert_size": lp.expert_size,
                 "overlap": lp.overlap()}
                for lp in self.layers
            ],
        }

    def save(self, folder: str | Path) -> Path:
        self.validate()
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for index, lp in enumerate(self.layers):
            tensors[f"shared.{index}"] = lp.shared.contiguous()
            tensors[f"experts.{index}"] = lp.experts.contiguous()
        atomic_save_safetensors(tensors, folder / PLAN_TENSORS)
        atomic_write_text(folder / PLAN_JSON, json.dumps(self.summary(), indent=2))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> ExpertPlan:
        folder = Path(folder)
        if not (folder / PLAN_JSON).is_file() or not (folder / PLAN_TENSORS).is_file():
            raise ReadmoeError(f"{folder} is not a plan folder (needs {PLAN_JSON} and "
                               f"{PLAN_TENSORS}); create one with `readmoe refactor`")
        info = json.loads((folder / PLAN_JSON).read_text())
        tensors = load_file(str(folder / PLAN_TENSORS))
        layers = [LayerPlan(tensors[f"shared.{i}"], tensors[f"experts.{i}"])
                  for i in range(len(info["layers"]))]
        plan = cls(info["method"], info["model"], info["expert_names"],
                   info["intermediate_size"], info["keep"], layers, info.get("meta", {}),
                   info.get("importance", "activation"))
        plan.validate()
        return plan


def dense_plan(model: str, intermediate_size: int, num_layers: int,
               routed: bool = True) -> ExpertPlan:
    """The dense model itself as a plan with one expert: every FFN channel in one routed
    expert (``routed``; the store can then offload and stream it, ``serve/experts/stream.py``)
    or in the shared expert (always resident). Why: the engine, its runner and the expert
    store then serve the unchanged dense model, compared with ReadME on the same code."""
    channels = torch.arange(intermediate_size, dtype=torch.int64)
    none = torch.zeros(0, dtype=torch.int64)
    layers = [LayerPlan(none.clone(), channels[None].clone()) if routed
              else LayerPlan(channels.clone(), none[None].clone()) for _ in range(num_layers)]
    plan = ExpertPlan(method="dense", model=model, expert_names=["ffn"],
                      intermediate_size=intermediate_size, keep=1.0, layers=layers,
                      importance="none")
    plan.validate()
    return plan
