"""ReadME folders as an out-of-tree vLLM model.

The ``vllm.general_plugins`` entry point (``plugin.register``) registers the folders' config
type and the ``ReadMEForCausalLM`` architecture, so ``vllm serve DIR`` and ``vllm.LLM(DIR)``
load a folder written by ``readmoe refactor`` / ``readmoe train`` as it is. One job per file:
``config`` (the folder's config class and what vLLM can serve), ``router`` (the pre-gating
router, with its own vLLM-managed KV cache), ``moe`` (one layer's FFN: shared expert plus
vLLM's fused MoE with top-1 routing), ``model`` (the backbone and the causal-LM head),
``weights`` (checkpoint names to vLLM parameters) and ``serve`` (``readmoe serve --backend
vllm``).

vLLM lives in its own environment (``make vllm``: ``.venv-vllm``); nothing here imports it at
package import, so the main environment never needs it.
"""
