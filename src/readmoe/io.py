"""Atomic file writes: a crash or a kill never leaves a half-written output behind."""

from __future__ import annotations

import json
import os
import shlex
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def _temp_beside(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(name, 0o666 & ~umask)  # mkstemp's 0600 would hide outputs from other users
    return Path(name)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    tmp = _temp_beside(path)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: object) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path,
                            metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    tmp = _temp_beside(path)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_save_figure(fig, path: str | Path, dpi: int = 110) -> None:
    """Save a matplotlib figure as PNG atomically."""
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    atomic_write_bytes(path, buffer.getvalue())


def write_results(folder: str | Path, name: str, data: dict, markdown: str) -> list[Path]:
    """A benchmark's result: ``<folder>/<name>.json`` and ``.md``, each written atomically
    (the markdown is printed too, so a run shows what it wrote)."""
    folder = Path(folder)
    paths = [folder / f"{name}.json", folder / f"{name}.md"]
    atomic_write_json(paths[0], data)
    atomic_write_text(paths[1], markdown if markdown.endswith("\n") else markdown + "\n")
    print(markdown)
    return paths


def command_line(argv: list[str] | None = None) -> str:
    """How a benchmark run was started, as a reader reruns it from the repository root: the
    script path relative to the working directory and every argument shell-quoted."""
    argv = sys.argv if argv is None else argv
    script = Path(argv[0])
    if script.is_absolute() and script.is_relative_to(Path.cwd()):
        script = script.relative_to(Path.cwd())
    return " ".join(["python", shlex.quote(str(script)), *map(shlex.quote, argv[1:])])
