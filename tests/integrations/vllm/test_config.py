"""What the plugin knows of a folder without vLLM: the config class loaded on its own, the
folders it refuses, the padding that lets tensor parallelism split any FFN size. Runs in both
environments."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest

from readmoe.integrations.vllm.config import check_servable, padded, readme_config_class

TINY = dict(vocab_size=100, hidden_size=64, dense_intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, num_experts=3,
            shared_intermediate_sizes=[32, 0], expert_intermediate_sizes=[16, 40])


def test_config_class_loads_without_the_modelling_package():
    # readmoe.model's package imports code the transformers of vLLM's environment cannot run
    code = ("import sys; from readmoe.integrations.vllm.config import readme_config_class; "
            "cls = readme_config_class(); print(cls.model_type, 'readmoe.model' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["readme", "False"]


def test_loaded_class_validates_as_the_package_class_does():
    cls = readme_config_class()
    assert cls is readme_config_class()  # loaded once
    config = cls(**TINY, router_type="pregating")
    assert config.needs_routing and config.router_dim == 64
    with pytest.raises(ValueError, match="expert_intermediate_sizes has 1 entries"):
        cls(**{**TINY, "expert_intermediate_sizes": [16]})


def test_padding_is_the_next_multiple():
    assert [padded(size, 2) for size in (0, 1, 408, 409)] == [0, 2, 408, 410]
    assert padded(409, 1) == 409 and padded(359, 4) == 360


def config(**overrides):
    fields = dict(router_type="pregating", needs_routing=True, num_experts=3, hidden_act="silu",
                  num_attention_heads=9, num_key_value_heads=3, router_dim=64, router_heads=2,
                  hidden_size=576, expert_intermediate_sizes=[16, 40])
    return SimpleNamespace(**{**fields, **overrides})


@pytest.mark.parametrize("overrides, tp_size, message", [
    (dict(router_type="none"), 1, "no router .*`readmoe train`"),
    (dict(router_type="oracle"), 1, "unknown router_type 'oracle'"),
    (dict(hidden_act="gelu"), 1, "SwiGLU"),
    (dict(router_hysteresis=0.5), 1,
     r"router_hysteresis 0.5 .* hf_overrides=\{'router_hysteresis': 0\}"),
    ({}, 2, "tensor_parallel_size 2 must divide the 9 attention heads"),
    (dict(num_attention_heads=8, num_key_value_heads=3), 2, "the 3 KV heads"),
])
def test_folders_vllm_cannot_serve_are_refused_with_the_fix(overrides, tp_size, message):
    with pytest.raises(ValueError, match=message):
        check_servable(config(**overrides), tp_size)


@pytest.mark.parametrize("overrides, tp_size", [
    ({}, 1), ({}, 3), ({}, 9),  # 9 heads over 9 ranks: each KV head on 3 ranks
    (dict(router_type="none", needs_routing=False, num_experts=1), 1),
    (dict(router_type="layerwise"), 1),
])
def test_servable_folders_pass(overrides, tp_size):
    check_servable(config(**overrides), tp_size)


CPU_HEADS = [32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512]


@pytest.mark.parametrize("overrides, message", [
    (dict(router_heads=4), "router's attention heads are 16 wide"),
    (dict(hidden_size=570), "hidden_size 570 is not a multiple of 32"),
])
def test_what_the_cpu_kernels_cannot_run_is_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        check_servable(config(**overrides), 1, CPU_HEADS, 32)


def test_cpu_kernel_limits_leave_other_folders_alone():
    check_servable(config(), 1, CPU_HEADS, 32)
    check_servable(config(router_type="layerwise", router_heads=4), 1, CPU_HEADS, 32)
    check_servable(config(hidden_size=570, expert_intermediate_sizes=[0, 0]), 1, CPU_HEADS, 32)


def test_a_pickled_config_loads_in_a_fresh_process():
    # vLLM's spawned workers unpickle the config before any plugin has run
    import pickle

    blob = pickle.dumps(readme_config_class()(**TINY, router_type="pregating"))
    code = ("import pickle, sys; config = pickle.loads(sys.stdin.buffer.read()); "
            "print(type(config).__name__, config.num_experts)")
    out = subprocess.run([sys.executable, "-c", code], input=blob, capture_output=True,
                         check=True).stdout.decode().split()
    assert out == ["ReadMEConfig", "3"]
