"""``readmoe serve MODEL --backend vllm [vLLM args]``: vLLM's OpenAI server on a ReadME folder.

The command becomes ``vllm serve`` in the same process (``exec``: the pid, signals and exit
status are vLLM's), with the plugin loaded by vLLM itself from the entry point. Arguments pass
through as typed, so every ``vllm serve`` option works, with three readmoe conventions kept:
the server listens on 127.0.0.1 unless ``--host`` says otherwise (vLLM's own default is every
interface), ``$READMOE_API_KEY`` is the key when no ``--api-key`` is given, and nothing is
fetched from a model hub (``HF_HUB_OFFLINE=1`` unless set). The options that ``readmoe serve``
and ``vllm serve`` share mean the same in both (``FORWARDED``); the other options of readmoe's
own engine (scheduler, expert offloading, queue, ...) have no vLLM meaning and are refused
rather than silently dropped.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import NoReturn

from readmoe.errors import ReadmoeError
from readmoe.server.config import API_KEY_ENV, ServerConfig

BACKEND_OPTION = "--backend"
FORWARDED = ("--host", "--port", "--api-key", "--served-model-name", "--dtype", "--block-size",
             "--enforce-eager")


def _names(args: Sequence[str]) -> set[str]:
    return {arg.split("=", 1)[0] for arg in args if arg.startswith("--")}


def vllm_serve_argv(argv: Sequence[str], model: str, engine_only: Collection[str],
                    environ: Mapping[str, str]) -> list[str]:
    """The ``vllm serve`` command line for ``readmoe`` ``argv`` (from ``serve`` on).

    ``engine_only``: the options of ``readmoe serve`` that only its own engine understands.
    """
    if not Path(model).is_dir():
        raise ReadmoeError(f"--backend vllm serves a model folder (a ReadME folder from "
                           f"`readmoe refactor` / `readmoe train`, or any folder vLLM "
                           f"supports); {model!r} is not one")
    rest, skip = [], False
    for arg in list(argv)[argv.index("serve") + 1:]:
        if skip:
            skip = False
        elif arg == BACKEND_OPTION:
            skip = True
        elif not arg.startswith(f"{BACKEND_OPTION}="):
            rest.append(arg)
    refused = sorted(_names(rest) & set(engine_only))
    if refused:
        raise ReadmoeError(f"{', '.join(refused)}: options of readmoe's own engine, with no "
                           "meaning in vLLM; drop them with --backend vllm (vLLM's options "
                           "pass through: see `vllm serve --help`)")
    given = _names(rest)
    if "--host" not in given:
        rest += ["--host", ServerConfig().host]
    if "--api-key" not in given and environ.get(API_KEY_ENV):
        rest += ["--api-key", environ[API_KEY_ENV]]
    return ["serve", *rest]


def exec_vllm_serve(argv: Sequence[str], model: str, engine_only: Collection[str]) -> NoReturn:
    """Replace this process with ``vllm serve``."""
    command = vllm_serve_argv(argv, model, engine_only, os.environ)
    if importlib.util.find_spec("vllm") is None:
        raise ReadmoeError("vLLM is not installed in this environment: run `make vllm` and "
                           "serve with .venv-vllm/bin/readmoe serve MODEL --backend vllm")
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, "-m", "vllm.entrypoints.cli.main", *command],
              env)
