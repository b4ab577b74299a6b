"""Device and dtype resolution: machine defaults, explicit choices, refusals with the fix."""

from __future__ import annotations

import argparse

import pytest
import torch

from readmoe.errors import ReadmoeError
from readmoe.models.device import add_placement_args, placement_from_args, resolve_placement


def test_defaults_follow_the_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    placement = resolve_placement()
    assert (placement.device, placement.dtype) == (torch.device("cpu"), torch.float32)
    assert not placement.reduced and placement.describe() == "cpu float32"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    gpu = resolve_placement()
    assert (gpu.device, gpu.dtype) == (torch.device("cuda"), torch.bfloat16)
    assert gpu.reduced and gpu.to_dict() == {"device": "cuda", "dtype": "bfloat16"}
    assert resolve_placement("cuda:1", "float32").device == torch.device("cuda", 1)
    with pytest.raises(ReadmoeError, match="2 GPU"):
        resolve_placement("cuda:2")


def test_explicit_choices_and_refusals(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_placement("cpu", "bfloat16").dtype == torch.bfloat16
    with pytest.raises(ReadmoeError, match="--device cpu"):
        resolve_placement("cuda")
    with pytest.raises(ReadmoeError, match="choose one of cpu, cuda"):
        resolve_placement("tpu")
    with pytest.raises(ReadmoeError, match="unknown dtype"):
        resolve_placement("cpu", "int8")


def test_autocast_only_for_reduced_dtypes():
    with resolve_placement("cpu", "float32").autocast():
        assert not torch.is_autocast_enabled("cpu")
    with resolve_placement("cpu", "bfloat16").autocast():
        assert torch.is_autocast_enabled("cpu")
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


def test_cli_flags():
    parser = argparse.ArgumentParser()
    add_placement_args(parser)
    placement = placement_from_args(parser.parse_args(["--device", "cpu", "--dtype",
                                                       "float16"]))
    assert placement.dtype == torch.float16


@pytest.mark.parametrize("command", [
    ["stats", "M", "--corpus", "C", "--out", "O"],
    ["refactor", "M", "--corpus", "C", "--out", "O"],
    ["train", "M", "--corpus", "C", "--out", "O"],
    ["eval", "ppl", "M", "--corpus", "C"],
    ["eval", "tasks", "M", "--tasks", "arc_easy"],
    ["analyze", "M", "--corpus", "C", "--out", "O"],
    ["bench", "serve", "M", "--corpus", "C"],
    ["serve", "M"],
    ["generate", "M", "hi"],
    ["chat", "M"],
])
def test_every_stage_takes_device_and_dtype(monkeypatch, capsys, command):
    """Each command that loads a model resolves --device/--dtype before any work: on a
    machine without a GPU, --device cuda is refused with the fix, naming no missing file."""
    from readmoe.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main([*command, "--device", "cuda", "--dtype", "bfloat16"]) == 2
    assert "--device cpu" in capsys.readouterr().err
