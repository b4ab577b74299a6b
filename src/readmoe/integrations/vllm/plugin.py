"""The ``vllm.general_plugins`` entry point: make vLLM load ReadME folders as they are.

vLLM calls ``register`` in every process it starts (the API server, the engine core, each
worker) before it reads a model's config. Two registrations, both idempotent:

- the folder's config type ``readme`` with transformers' ``AutoConfig`` (the folder's own
  ``configuration_readme.py``, see ``config.py``), so no ``--trust-remote-code`` is needed and
  no code is executed from the model folder;
- the architecture ``ReadMEForCausalLM`` with vLLM's ``ModelRegistry``, by module path, so the
  model module (and its vLLM imports) loads only in the processes that build the model.
"""

from __future__ import annotations

ARCHITECTURE = "ReadMEForCausalLM"
MODEL_CLASS = "readmoe.integrations.vllm.model:ReadMEForCausalLM"


def register() -> None:
    from transformers import AutoConfig
    from vllm import ModelRegistry

    from readmoe.integrations.vllm.config import readme_config_class

    config_class = readme_config_class()
    AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
