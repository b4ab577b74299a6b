"""Dense checkpoints: resolve a model name, check its architecture, load it."""

from readmoe.models.checks import SUPPORTED_MODEL_TYPES, check_dense_config
from readmoe.models.loader import load_config, load_model, load_tokenizer, model_info, resolve_model

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "check_dense_config",
    "load_config",
    "load_model",
    "load_tokenizer",
    "model_info",
    "resolve_model",
]
