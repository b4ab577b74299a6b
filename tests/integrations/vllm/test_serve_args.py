"""`readmoe serve MODEL --backend vllm [vLLM args]`: the `vllm serve` command line it becomes,
and what it refuses. Runs in both environments (nothing here starts vLLM)."""

from __future__ import annotations

import importlib.util

import pytest

from readmoe.cli import build_parser, main
from readmoe.integrations.vllm.serve import FORWARDED, vllm_serve_argv


@pytest.fixture()
def folder(tmp_path):
    return str(tmp_path)


def engine_only() -> frozenset[str]:
    return build_parser().parse_args(["serve", "m"]).engine_only


def test_arguments_pass_through_with_readmoe_defaults(folder):
    argv = ["serve", folder, "--backend", "vllm", "--port", "9000", "--max-model-len", "512",
            "--tensor-parallel-size", "2", "--dtype=float32"]
    assert vllm_serve_argv(argv, folder, engine_only(), {}) == [
        "serve", folder, "--port", "9000", "--max-model-len", "512", "--tensor-parallel-size",
        "2", "--dtype=float32", "--host", "127.0.0.1"]
    keyed = vllm_serve_argv(["serve", folder, "--backend=vllm", "--host", "0.0.0.0"], folder,
                            engine_only(), {"READMOE_API_KEY": "k"})
    assert keyed == ["serve", folder, "--host", "0.0.0.0", "--api-key", "k"]
    explicit = vllm_serve_argv(["serve", folder, "--backend", "vllm", "--api-key=mine"], folder,
                               engine_only(), {"READMOE_API_KEY": "k"})
    assert explicit == ["serve", folder, "--api-key=mine", "--host", "127.0.0.1"]


def test_engine_only_options_are_the_rest_of_readmoe_serve():
    options = engine_only()
    assert {"--capacity", "--scheduler", "--max-queue", "--device", "--tier"} <= options
    assert not options & {*FORWARDED, "--backend", "-h", "--help"}


def test_engine_options_are_refused_with_vllm(folder, capsys):
    status = main(["serve", folder, "--backend", "vllm", "--capacity", "3", "--tier=ram"])
    assert status == 2
    assert "--capacity, --tier: options of readmoe's own engine" in capsys.readouterr().err


def test_a_model_that_is_no_folder_is_refused(capsys):
    assert main(["serve", "smollm2-135m", "--backend", "vllm"]) == 2
    assert "serves a model folder" in capsys.readouterr().err


def test_unknown_arguments_are_still_refused_without_vllm(folder, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", folder, "--max-model-len", "512"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --max-model-len 512" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None,
                    reason="with vLLM installed this command would start it")
def test_without_vllm_installed_the_fix_is_named(folder, capsys):
    assert main(["serve", folder, "--backend", "vllm"]) == 2
    assert "run `make vllm`" in capsys.readouterr().err
