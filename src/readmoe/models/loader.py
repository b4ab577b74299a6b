"""Resolve a model name (HF folder, .gguf file, built-in name) and load it in fp32.

Every check that can fail runs before weights are read: the path exists, the config parses,
the architecture is supported, the safetensors headers are intact.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from readmoe.errors import ReadmoeError
from readmoe.models.builtin import BUILTIN_MODELS, builtin_gguf_path
from readmoe.models.checks import check_dense_config, check_weight_files
from readmoe.models.convert import convert_gguf, gguf_cache_folder

READMOE_MODEL_TYPE = "readme"


def resolve_model(spec: str) -> Path:
    """Return a local HF-format folder for `spec`, converting GGUF files once into the cache."""
    if spec in BUILTIN_MODELS:
        model = BUILTIN_MODELS[spec]
        gguf = builtin_gguf_path(model)
        return convert_gguf(gguf, gguf_cache_folder(gguf, model.name))
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf(path, gguf_cache_folder(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ReadmoeError(f"{path}: no config.json; a model folder must be in Hugging Face "
                               "format (save_pretrained)")
        return path
    if path.exists():
        raise ReadmoeError(f"{path}: not a model; give a Hugging Face model folder, a .gguf "
                           "file, or a built-in name")
    names = ", ".join(sorted(BUILTIN_MODELS))
    raise ReadmoeError(f"model {spec!r} not found: give a Hugging Face model folder, a .gguf "
                       f"file, or a built-in name ({names})")


def _read_config_json(folder: Path) -> dict:
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ReadmoeError(f"{folder / 'config.json'}: unreadable config ({exc})") from None


def is_readme_folder(folder: Path) -> bool:
    return _read_config_json(folder).get("model_type") == READMOE_MODEL_TYPE


def load_config(spec: str):
    """Load and check the config of a dense or ReadME model."""
    from transformers import AutoConfig

    folder = resolve_model(spec)
    raw = _read_config_json(folder)
    if raw.get("model_type") == READMOE_MODEL_TYPE:
        import readmoe.model  # noqa: F401  registers the ReadME classes with the Auto factories

        return AutoConfig.from_pretrained(folder)
    try:
        config = AutoConfig.from_pretrained(folder)
    except Exception as exc:
        kind = raw.get("model_type", "unknown")
        raise ReadmoeError(f"{folder}: cannot parse config of architecture {kind} "
                           f"({str(exc).strip().splitlines()[0]})") from None
    check_dense_config(config, str(spec))
    return config


def load_model(spec: str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Load a dense (Llama-family) or ReadME model, in eval mode."""
    from transformers import AutoModelForCausalLM

    config = load_config(spec)
    folder = resolve_model(spec)
    check_weight_files(folder)
    # use_kernels=False: transformers would otherwise swap layers for kernels it downloads
    # from the Hub when the model first trains on a GPU (offline machines fail there)
    model = AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=dtype,
                                                 use_safetensors=True, use_kernels=False)
    return model.to(device).eval()


def load_tokenizer(spec: str):
    from transformers import AutoTokenizer

    folder = resolve_model(spec)
    if is_readme_folder(folder):
        # registered first, or transformers asks whether to run the folder's own code
        import readmoe.model  # noqa: F401
    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as exc:
        raise ReadmoeError(f"{folder}: no usable tokenizer ({str(exc).strip().splitlines()[0]});"
                           " save one beside the model (tokenizer.save_pretrained)") from None


def model_info(spec: str) -> dict:
    """A JSON-ready summary read from the config and the safetensors headers, without weights."""
    from readmoe.models.checks import check_safetensors_file

    config = load_config(spec)
    folder = resolve_model(spec)
    files = check_weight_files(folder)
    parameters = 0
    dtypes: set[str] = set()
    for path in files:
        for shape in check_safetensors_file(path).values():
            count = 1
            for dim in shape:
                count *= dim
            parameters += count
        dtypes.update(_safetensors_dtypes(path))
    archs = getattr(config, "architectures", None) or []
    return {
        "model": spec,
        "path": str(folder),
        "model_type": config.model_type,
        "architecture": archs[0] if archs else config.model_type,
        "layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "intermediate_size": getattr(config, "intermediate_size", None),
        "heads": config.num_attention_heads,
        "kv_heads": getattr(config, "num_key_value_heads", config.num_attention_heads),
        "vocab_size": config.vocab_size,
        "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
        "parameters": parameters,
        "dtype": ",".join(sorted(dtypes)),
    }


def _safetensors_dtypes(path: Path) -> set[str]:
    with path.open("rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(size))
    return {v["dtype"].lower() for k, v in header.items() if k != "__metadata__"}
