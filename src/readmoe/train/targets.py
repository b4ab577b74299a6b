"""Routing-distillation targets, computed once from the dense model and stored compactly.

For each training token and layer the oracle's overlap score of every expert (how many of
the token's top dense channels fall in the expert, readmoe.refactor.oracle) is stored as
uint16 `[N, L, E]` next to the token blocks, so router training never reruns the dense
model. Files: ``targets.safetensors`` (``tokens`` int64 `[num_blocks, block]`, ``scores``
uint16 `[num_blocks, block, L, E]`) + ``targets.json`` (provenance, sizes).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm import tqdm

from readmoe.errors import ReadmoeError
from readmoe.io import atomic_save_safetensors, atomic_write_json

TARGETS_JSON = "targets.json"
TARGETS_TENSORS = "targets.safetensors"


@dataclass
class DistillTargets:
    tokens: torch.Tensor  # [num_blocks, block] int64
    scores: torch.Tensor  # [num_blocks, block, L, E] uint16 overlap counts
    expert_sizes: list[int]  # routed channels per expert, per layer (to normalise scores)
    meta: dict

    def oracle_labels(self) -> torch.Tensor:
        """The oracle expert of every token: argmax of the scores summed over layers."""
        return self.scores.float().sum(dim=2).argmax(dim=-1)  # [num_blocks, block]

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        atomic_save_safetensors({"tokens": self.tokens, "scores": self.scores},
                                folder / TARGETS_TENSORS)
        atomic_write_json(folder / TARGETS_JSON, {**self.meta, "expert_sizes": self.expert_sizes,
                                                  "shape": list(self.scores.shape)})

    @classmethod
    def load(cls, folder: str | Path) -> DistillTargets:
        folder = Path(folder)
        if not (folder / TARGETS_JSON).is_file():
            raise ReadmoeError(f"{folder} holds no distillation targets ({TARGETS_JSON})")
        meta = json.loads((folder / TARGETS_JSON).read_text())
        tensors = load_file(str(folder / TARGETS_TENSORS))
        sizes = meta.pop("expert_sizes")
        meta.pop("shape", None)
        return cls(tensors["tokens"], tensors["scores"], sizes, meta)


@torch.no_grad()
def build_targets(oracle, blocks: torch.Tensor, batch_size: int = 4,
                  meta: dict | None = None) -> DistillTargets:
    """Score every token of `blocks` ([num_blocks, block]) with the oracle router."""
    pieces = []
    for start in tqdm(range(0, blocks.shape[0], batch_size), desc="distillation targets",
                      unit="batch"):
        scores = oracle.layer_scores(blocks[start : start + batch_size])  # [B, T, L, E]
        pieces.append(scores.round().to(torch.int32).cpu().to(torch.uint16))
    sizes = [lp.expert_size for lp in oracle.plan.layers]
    return DistillTargets(blocks.clone(), torch.cat(pieces), sizes, dict(meta or {}))
