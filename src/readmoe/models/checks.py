"""Architecture and file checks that run before any long work starts.

Refactoring needs a Llama-family decoder with a gated MLP (gate_proj / up_proj / down_proj):
the experts are slices of those three matrices. Everything else is refused up front, with
the architecture named, instead of failing deep inside a hook or a slice.
"""

from __future__ import annotations

from pathlib import Path

from safetensors import safe_open

from readmoe.errors import ReadmoeError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
GATED_ACTIVATIONS = ("silu", "swish", "gelu", "gelu_pytorch_tanh", "gelu_new")
PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_dense_config(config: object, source: str) -> None:
    """Refuse configs whose FFN is not a gated MLP we can carve experts from."""
    model_type = getattr(config, "model_type", None)
    archs = getattr(config, "architectures", None) or []
    if model_type not in SUPPORTED_MODEL_TYPES:
        found = model_type or "unknown"
        if archs:
            found += f" ({', '.join(archs)})"
        raise ReadmoeError(
            f"{source}: unsupported architecture {found}; readmoe refactors Llama-family "
            f"decoders with gated MLPs ({', '.join(SUPPORTED_MODEL_TYPES)})")
    act = getattr(config, "hidden_act", None)
    if act not in GATED_ACTIVATIONS:
        raise ReadmoeError(f"{source}: hidden_act {act!r} is not a gated-MLP activation "
                           f"({', '.join(GATED_ACTIVATIONS)})")
    if getattr(config, "mlp_bias", False):
        raise ReadmoeError(f"{source}: MLP biases are not supported (mlp_bias=True)")
    for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size"):
        value = getattr(config, name, None)
        if not isinstance(value, int) or value <= 0:
            raise ReadmoeError(f"{source}: config field {name} is missing or invalid ({value!r})")


def check_weight_files(folder: Path) -> list[Path]:
    """Return the folder's safetensors files after checking each header parses.

    Pickled weights are refused: loading them can run arbitrary code.
    """
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLED_SUFFIXES)
        if pickled:
            raise ReadmoeError(
                f"{folder}: only pickled weights found ({', '.join(pickled)}); readmoe refuses "
                "pickles, convert them to safetensors first (save_pretrained(..., "
                "safe_serialization=True))")
        raise ReadmoeError(f"{folder}: no *.safetensors weight files found")
    for path in files:
        check_safetensors_file(path)
    return files


def check_safetensors_file(path: Path) -> dict[str, tuple[int, ...]]:
    """Parse a safetensors header and check the file holds every byte it declares."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
    except Exception as exc:  # the library raises several types for a damaged file
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ReadmoeError(f"{path}: corrupted safetensors file ({first_line}); "
                           "re-download or re-save it") from None
    return shapes
