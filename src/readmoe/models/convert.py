"""One-time conversion of a GGUF checkpoint into a safetensors folder in the cache.

Loading the GGUF de-quantizes every tensor (about 30 s for the default model); the
converted folder loads in under 3 s. transformers refuses to ``save_pretrained`` a
GGUF-loaded model, so the weights are moved into a model built from the config without its
quantization settings, then saved.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from readmoe.errors import ReadmoeError
from readmoe.io import atomic_write_json
from readmoe.models.checks import check_dense_config
from readmoe.paths import cache_dir

CONVERTED_MARKER = "readmoe_converted.json"


def gguf_cache_folder(gguf_path: Path, name: str | None = None) -> Path:
    """The cache folder of a GGUF file, keyed by its path, size and modification time."""
    stat = gguf_path.stat()
    key = f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    label = name or gguf_path.stem
    return cache_dir() / "models" / f"{label}-{digest}"


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Convert `gguf_path` into an fp32 safetensors folder at `out_dir` (atomic)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if (out_dir / CONVERTED_MARKER).is_file():
        return out_dir
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
    except Exception as exc:
        raise ReadmoeError(f"{gguf_path}: cannot read GGUF metadata ({_first_line(exc)})") from None
    check_dense_config(config, str(gguf_path))
    print(f"readmoe: converting {gguf_path.name} to safetensors once (cached in {out_dir})",
          file=sys.stderr)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                      dtype=torch.float32, use_kernels=False)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / CONVERTED_MARKER, {"source": str(gguf_path.resolve())})
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if not (out_dir / CONVERTED_MARKER).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
