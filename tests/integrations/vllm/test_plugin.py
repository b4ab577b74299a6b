"""The plugin as vLLM finds it: the entry point, the two registrations, and which `readmoe
serve` options reach `vllm serve`."""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest

from tests.integrations.vllm.main_env import SKIP_REASON

pytest.importorskip("vllm", reason=SKIP_REASON)

from transformers import AutoConfig  # noqa: E402
from vllm import ModelRegistry  # noqa: E402
from vllm.entrypoints.launchers.cli_args import make_arg_parser  # noqa: E402
from vllm.utils.argparse_utils import FlexibleArgumentParser  # noqa: E402

from readmoe.cli import build_parser  # noqa: E402
from readmoe.integrations.vllm.plugin import ARCHITECTURE, register  # noqa: E402
from readmoe.integrations.vllm.serve import FORWARDED  # noqa: E402


def test_entry_point_names_the_register_function():
    plugins = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert plugins["readmoe"] == "readmoe.integrations.vllm.plugin:register"


def test_register_makes_folders_loadable_without_remote_code(tiny_folders):
    register()
    register()  # vLLM calls it in every process, maybe more than once
    assert ARCHITECTURE in ModelRegistry.get_supported_archs()
    config = AutoConfig.from_pretrained(tiny_folders / "pregating", trust_remote_code=False)
    assert (config.model_type, config.router_type, config.num_experts) == ("readme",
                                                                           "pregating", 3)


def test_shared_options_exist_in_vllm_serve_and_engine_options_do_not():
    vllm_options = {name for action in make_arg_parser(FlexibleArgumentParser())._actions
                    for name in action.option_strings}
    assert set(FORWARDED) <= vllm_options
    engine_only = build_parser().parse_args(["serve", "m"]).engine_only
    assert not engine_only & vllm_options  # refusing them never blocks a vLLM option
