"""Second moments E[a a^T] of down_proj's input per layer and domain: what a least-squares
refit of the kept channels' down projection needs (``refactor/refit.py``).

They extend a statistics folder and are made from exactly its tokens (the same blocks), so the
importance criteria and the refit see the same data. Stored as ``gram/<domain>.safetensors``
under the statistics folder, ``gram.{l}`` float32 ``[I, I]`` per layer, with metadata naming the
inputs (model fingerprint, corpus fingerprint, tokens, block size). Each domain's file is
written atomically once it is done, so a killed run resumes at the first missing domain; a file
made from other inputs (the statistics were recomputed since) is recomputed, never reused.
At 1536 channels and 30 layers a domain's file is 283 MB: they exist only when asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from readmoe.errors import ReadmoeError
from readmoe.io import atomic_save_safetensors
from readmoe.refactor.hooks import feed_blocks
from readmoe.refactor.stats import ActivationStats

GRAM_DIR = "gram"
_INPUTS = ("fingerprint", "corpus_fingerprint", "tokens_requested", "block_size")


@dataclass(frozen=True)
class Grams:
    """Per-domain second moments on disk, read one layer at a time (all of them at once
    would be 6 x 30 x 1536^2 doubles)."""

    folder: Path
    tokens: dict[str, int]  # domain -> tokens the moments average over

    @property
    def domains(self) -> list[str]:
        return sorted(self.tokens)

    def layer(self, domain: str, index: int) -> torch.Tensor:
        """``[I, I]`` float64: the mean of a a^T over ``domain``'s tokens at layer ``index``."""
        with safe_open(str(self.folder / f"{domain}.safetensors"), framework="pt") as handle:
            return handle.get_tensor(f"gram.{index}").double()


def _metadata(stats: ActivationStats, domain: str) -> dict[str, str]:
    return {**{key: str(getattr(stats, key)) for key in _INPUTS},
            "tokens": str(stats.tokens[domain])}


def _is_current(path: Path, want: dict[str, str]) -> bool:
    if not path.is_file():
        return False
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata() == want


@torch.no_grad()
def domain_gram(model, blocks: torch.Tensor, batch_size: int, desc: str) -> list[torch.Tensor]:
    """Per layer ``[I, I]`` float64: mean of a a^T over every token of ``blocks``, with a the
    down_proj input. Products run in the model's dtype a batch at a time, sums in float64."""
    sums: dict[int, torch.Tensor] = {}

    def sink(layer: int, act: torch.Tensor) -> None:  # act: [B, T, I]
        flat = act.detach().reshape(-1, act.shape[-1]).float()  # [B*T, I]
        product = (flat.T @ flat).double().cpu()  # [I, I]
        sums[layer] = sums[layer] + product if layer in sums else product

    feed_blocks(model, blocks, batch_size, desc, sink)
    return [sums[layer] / blocks.numel() for layer in sorted(sums)]


def compute_grams(model, tokenizer, corpus, stats: ActivationStats, stats_dir: str | Path,
                  batch_size: int = 4) -> Grams:
    """The second moments of every domain of ``stats`` (computed, resumed or reused) from
    ``model``, which must be the model the statistics were computed on."""
    folder = Path(stats_dir) / GRAM_DIR
    folder.mkdir(parents=True, exist_ok=True)
    if model.config.intermediate_size != stats.intermediate_size:
        raise ReadmoeError(f"the model's FFN width is {model.config.intermediate_size}, the "
                           f"statistics' {stats.intermediate_size}: pass the dense model the "
                           "statistics were computed on")
    for domain in stats.domains:
        path = folder / f"{domain}.safetensors"
        want = _metadata(stats, domain)
        if _is_current(path, want):
            continue
        blocks = stats.blocks(tokenizer, corpus, domain)
        grams = domain_gram(model, blocks, batch_size, f"second moments {domain}")
        atomic_save_safetensors({f"gram.{i}": g.float() for i, g in enumerate(grams)}, path,
                                metadata=want)
    return Grams(folder, {d: stats.tokens[d] for d in stats.domains})
