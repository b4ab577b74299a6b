"""A cheap identity for a model's weights, so artefacts derived from one model are never
silently applied to another (statistics, plans, distillation targets)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

SAMPLE_BYTES = 1 << 20


def model_fingerprint(folder: str | Path) -> str:
    """Hash of the config's shape fields, each safetensors header, and a sample of its data.

    Two checkpoints with the same shapes but different weights (a fine-tune) differ in the
    sampled bytes; reading 1 MiB per file keeps this instant on multi-GB models.
    """
    folder = Path(folder)
    digest = hashlib.sha256()
    config = json.loads((folder / "config.json").read_text())
    keys = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "vocab_size")
    digest.update(json.dumps({k: config.get(k) for k in keys}, sort_keys=True).encode())
    for path in sorted(folder.glob("*.safetensors")):
        with path.open("rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            digest.update(handle.read(size))
            total = path.stat().st_size
            handle.seek(max(8 + size, total // 2 - SAMPLE_BYTES // 2))
            digest.update(handle.read(SAMPLE_BYTES))
    return digest.hexdigest()[:24]


def tensors_fingerprint(folder: str | Path, sample: int = 4096) -> str:
    """Hash of each safetensors header and the first ``sample`` bytes of every tensor.

    Stricter than ``model_fingerprint`` where a derived model differs from another in some
    tensors only (a refit changes every down_proj and nothing else), still reading a few KiB
    per tensor."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")):
        with path.open("rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            header = handle.read(size)
            digest.update(header)
            for name, info in sorted(json.loads(header).items()):
                if name == "__metadata__":
                    continue
                start, end = info["data_offsets"]
                handle.seek(8 + size + start)
                digest.update(handle.read(min(sample, end - start)))
    return digest.hexdigest()[:24]
