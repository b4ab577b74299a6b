"""Per-domain activation statistics of the input of down_proj per channel and layer: its mean
absolute value (the paper's channel importance), its mean square (the `contribution`
importance, ``refactor/importance.py``) and its signed mean (what a compensation bias for
dropped channels is made of).

Stored as a folder (``stats.json`` + ``stats.safetensors`` with ``[L, I]`` float32 tensors
``mean_abs.<domain>``, ``mean_sq.<domain>`` and ``mean.<domain>`` per domain; folders written
before the mean square or the signed mean existed load without them, and only what needs
them refuses). The folder is rewritten atomically after every finished
domain, so a killed run resumes at the first unfinished domain with identical results.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from readmoe.data.tokens import pack_blocks
from readmoe.errors import ReadmoeError
from readmoe.io import atomic_save_safetensors, atomic_write_json
from readmoe.refactor.hooks import feed_blocks

STATS_JSON = "stats.json"
STATS_TENSORS = "stats.safetensors"
FORMAT_VERSION = 1
# what statistics depend on, and how a refusal names each to the user
INPUT_LABELS = {"fingerprint": "model", "corpus_fingerprint": "corpus",
                "tokens_requested": "token count (--tokens)",
                "block_size": "block size (--block-size)"}
KINDS = ("mean_abs", "mean_sq", "mean")  # the per-domain [L, I] tensors, in domain_means order


@dataclass
class ActivationStats:
    model: str
    fingerprint: str
    num_layers: int
    intermediate_size: int
    corpus: str
    corpus_fingerprint: str
    block_size: int
    tokens_requested: int
    mean_abs: dict[str, torch.Tensor] = field(default_factory=dict)  # domain -> [L, I]
    mean: dict[str, torch.Tensor] = field(default_factory=dict)  # domain -> [L, I], signed
    mean_sq: dict[str, torch.Tensor] = field(default_factory=dict)  # domain -> [L, I]
    tokens: dict[str, int] = field(default_factory=dict)

    @property
    def domains(self) -> list[str]:
        return sorted(self.mean_abs)

    def check_inputs(self, folder: str | Path, **expected: object) -> None:
        """Refuse statistics made from other inputs than ``expected`` (keys of
        ``INPUT_LABELS``; a None value is not checked), naming the first that differs.

        Reusing them would carve experts from another model's or corpus's activations
        without any visible sign, so a mismatch is an error, never a silent reuse."""
        for key, want in expected.items():
            have = getattr(self, key)
            if want is None or have == want:
                continue
            if key == "fingerprint":
                what = f"on model {self.model!r}, whose weights differ from this one's"
            elif key == "corpus_fingerprint":
                what = f"on corpus {self.corpus!r}, whose documents differ from this corpus's"
            else:
                what = f"with {INPUT_LABELS[key]} {have}, not {want}"
            raise ReadmoeError(
                f"{folder} holds statistics computed {what}; recompute them: pass another "
                "statistics folder, add --recompute-stats, or delete it")

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        tensors = {f"{kind}.{d}": t.float().contiguous()
                   for kind in KINDS for d, t in getattr(self, kind).items()}
        atomic_save_safetensors(tensors, folder / STATS_TENSORS)
        meta = {k: getattr(self, k) for k in (
            "model", "fingerprint", "num_layers", "intermediate_size", "corpus",
            "corpus_fingerprint", "block_size", "tokens_requested", "tokens")}
        atomic_write_json(folder / STATS_JSON, {"format": FORMAT_VERSION, **meta})

    @classmethod
    def load(cls, folder: str | Path) -> ActivationStats:
        folder = Path(folder)
        if not (folder / STATS_JSON).is_file() or not (folder / STATS_TENSORS).is_file():
            raise ReadmoeError(f"{folder} holds no statistics ({STATS_JSON} + {STATS_TENSORS});"
                               " compute them with `readmoe stats`")
        meta = json.loads((folder / STATS_JSON).read_text())
        if meta.pop("format", None) != FORMAT_VERSION:
            raise ReadmoeError(f"{folder}: statistics format is not version {FORMAT_VERSION};"
                               " recompute them with `readmoe stats`")
        tensors = load_file(str(folder / STATS_TENSORS))
        kinds: dict[str, dict[str, torch.Tensor]] = {kind: {} for kind in KINDS}
        for key, value in tensors.items():
            kind, domain = key.split(".", 1)
            kinds[kind][domain] = value
        return cls(**meta, **kinds)

    def blocks(self, tokenizer, corpus, domain: str) -> torch.Tensor:
        """``domain``'s statistics blocks ``[n, block_size]`` packed again from ``corpus``, for
        what is computed later on exactly these tokens (second moments, a sequential refit);
        refused if the corpus no longer packs the count the statistics hold."""
        blocks = pack_blocks(tokenizer, corpus.documents(domain, "train"), self.block_size,
                             self.tokens_requested)
        if blocks.numel() != self.tokens[domain]:
            raise ReadmoeError(f"{domain}: the corpus now packs {blocks.numel()} statistics "
                               f"tokens, the statistics hold {self.tokens[domain]}; recompute "
                               "the statistics with --recompute-stats")
        return blocks

    def token_weighted_mean(self) -> torch.Tensor:
        """The signed mean over every domain's tokens together: `[L, I]`."""
        total = sum(self.tokens[d] for d in self.domains)
        return sum(self.mean[d].double() * self.tokens[d] for d in self.domains) / total


@torch.no_grad()
def domain_means(model, blocks: torch.Tensor, batch_size: int, desc: str
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean |down_proj input|, its mean square and its signed mean per layer and channel
    over all tokens of `blocks`: three `[L, I]` (the order of ``KINDS``)."""
    sums: dict[int, torch.Tensor] = {}

    def sink(layer: int, act: torch.Tensor) -> None:  # act: [B, T, I]
        act = act.detach()
        wide = act.double()
        total = torch.stack([wide.abs().sum(dim=(0, 1)), wide.square().sum(dim=(0, 1)),
                             wide.sum(dim=(0, 1))])  # [3, I]
        sums[layer] = sums[layer] + total if layer in sums else total

    feed_blocks(model, blocks, batch_size, desc, sink)
    stacked = (torch.stack([sums[layer] for layer in sorted(sums)]) / blocks.numel()).float()
    return stacked[:, 0].cpu(), stacked[:, 1].cpu(), stacked[:, 2].cpu()  # [L, 3, I]


def compute_stats(model, tokenizer, corpus, out: str | Path, *, model_name: str,
                  fingerprint: str, tokens_per_domain: int = 16384, block_size: int = 512,
                  batch_size: int = 4, domains: list[str] | None = None) -> ActivationStats:
    """Compute (or resume) statistics for every domain of `corpus` into folder `out`."""
    out = Path(out)
    config = model.config
    fresh = ActivationStats(
        model=model_name, fingerprint=fingerprint, num_layers=config.num_hidden_layers,
        intermediate_size=config.intermediate_size, corpus=str(corpus.path),
        corpus_fingerprint=corpus.fingerprint(), block_size=block_size,
        tokens_requested=tokens_per_domain)
    # earlier partial results resume, but only if they were made with the same inputs
    stats = ActivationStats.load(out) if (out / STATS_JSON).is_file() else fresh
    stats.check_inputs(out, **{k: getattr(fresh, k) for k in INPUT_LABELS})
    for domain in domains or corpus.domains:
        if domain in stats.mean_abs:
            continue
        blocks = pack_blocks(tokenizer, corpus.documents(domain, "train"), block_size,
                             tokens_per_domain)
        means = domain_means(model, blocks, batch_size, f"stats {domain}")
        for kind, value in zip(KINDS, means, strict=True):
            getattr(stats, kind)[domain] = value
        stats.tokens[domain] = int(blocks.numel())
        stats.save(out)
    return stats


def clear_stats(folder: str | Path) -> None:
    """Delete the statistics files of ``folder`` (only those: it may be a user's folder)."""
    for name in (STATS_JSON, STATS_TENSORS):
        (Path(folder) / name).unlink(missing_ok=True)
