"""Opening an engine on a model spec: a dense model served as one all-shared expert equals HF
generate on it; an offloaded ReadME model serves from a RAM store in the requested dtype; bad
combinations are refused with the fix."""

from __future__ import annotations

import argparse

import pytest
import torch

from readmoe.cli.engine_args import add_engine_args, engine_options
from readmoe.errors import ReadmoeError
from readmoe.models.device import resolve_placement
from readmoe.serve.launch import EngineOptions, dense_as_readme, open_engine
from readmoe.serve.packed import prepack_applies
from readmoe.serve.sampling import SamplingParams
from tests.conftest import tiny_model
from tests.server.helpers import save_tiny_model

CPU = resolve_placement("cpu", "float32")
PROMPTS = [[5, 9, 14, 3], [40, 41, 42, 43, 44, 45, 46]]


@pytest.fixture(scope="module")
def readme_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("launch") / "tiny")


def test_dense_as_readme_equals_hf_generate():
    dense = tiny_model()
    served = dense_as_readme(dense)
    assert served.config.num_experts == 1 and not served.config.needs_routing
    for prompt in PROMPTS:
        ids = torch.tensor([prompt])
        torch.testing.assert_close(served(ids).logits, dense(ids).logits, atol=1e-5, rtol=0)


def test_dense_folder_serves_through_the_engine(tiny_llama_dir):
    from readmoe.models import load_model

    dense = load_model(str(tiny_llama_dir))
    with open_engine(str(tiny_llama_dir), EngineOptions(), CPU) as served:
        outs = served.engine.generate(PROMPTS, SamplingParams(max_tokens=6))
        assert served.max_model_len == dense.config.max_position_embeddings
    for prompt, out in zip(PROMPTS, outs, strict=True):
        ref = dense.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False)
        assert out.token_ids == ref[0, len(prompt):].tolist()
    with (pytest.raises(ReadmoeError, match="dense model: it has no routed experts"),
          open_engine(str(tiny_llama_dir), EngineOptions(capacity=1), CPU)):
        pass


def test_offloaded_ram_tier_in_another_dtype(readme_dir):
    resident = open_engine(str(readme_dir), EngineOptions(), CPU)
    with resident as served:
        expected = [o.token_ids for o in served.engine.generate(PROMPTS, SamplingParams(5))]
    offload = EngineOptions(capacity=1, tier="ram", cache_policy="lru")
    with open_engine(str(readme_dir), offload, CPU) as served:
        assert served.experts["capacity"] == 1 and served.experts["expert_bytes_released"] > 0
        outs = served.engine.generate(PROMPTS, SamplingParams(5))
        assert [o.token_ids for o in outs] == expected
        assert served.engine.store.stats.misses > 0
    bf16 = resolve_placement("cpu", "bfloat16")
    with open_engine(str(readme_dir), offload, bf16) as served:
        assert served.engine.model.model.embed_tokens.weight.dtype == torch.bfloat16
        assert all(o.finished for o in served.engine.generate(PROMPTS, SamplingParams(3)))
    with (pytest.raises(ReadmoeError, match="--tier ram"),
          open_engine(str(readme_dir), EngineOptions(capacity=1), bf16)):
        pass


def test_int8_serving_opens_on_cpu_float32_only(readme_dir):
    with open_engine(str(readme_dir), EngineOptions(quantize="int8"), CPU) as served:
        assert served.engine.runner.quantize == "int8"
        assert all(o.finished for o in served.engine.generate(PROMPTS, SamplingParams(4)))
    with (pytest.raises(ReadmoeError, match="load it with --dtype float32"),
          open_engine(str(readme_dir), EngineOptions(quantize="int8"),
                      resolve_placement("cpu", "bfloat16"))):
        pass


def test_kv_dtype_option_reaches_the_cache_and_the_cli(readme_dir):
    args = argparse.ArgumentParser()
    add_engine_args(args)
    options = engine_options(args.parse_args(["--kv-dtype", "float16"]))
    with open_engine(str(readme_dir), options, CPU) as served:
        assert served.engine.kv.keys[0].dtype == torch.float16
        assert all(o.finished for o in served.engine.generate(PROMPTS, SamplingParams(3)))
    with pytest.raises(SystemExit):
        args.parse_args(["--kv-dtype", "fp8"])
    with (pytest.raises(ReadmoeError, match="--kv-dtype 'int4'"),
          open_engine(str(readme_dir), EngineOptions(kv_dtype="int4"), CPU)):
        pass


@pytest.mark.parametrize("prepack", [True, False])
def test_prepack_option_reaches_the_runner(readme_dir, prepack):
    with open_engine(str(readme_dir), EngineOptions(prepack=prepack), CPU) as served:
        blocked = served.engine.runner.packed[0].qkv.blocked
        assert (blocked is not None) == (prepack and prepack_applies(torch.device("cpu"),
                                                                     torch.float32))
        assert all(o.finished for o in served.engine.generate(PROMPTS, SamplingParams(3)))


def test_router_hysteresis_flag_overrides_the_folder(readme_dir, tiny_llama_dir):
    with open_engine(str(readme_dir), EngineOptions(router_hysteresis=0.7), CPU) as served:
        assert served.engine.model.config.router_hysteresis == 0.7
    with open_engine(str(readme_dir), EngineOptions(), CPU) as served:
        assert served.engine.model.config.router_hysteresis == 0.0
    with (pytest.raises(ReadmoeError, match="acts on a pre-gating router"),
          open_engine(str(tiny_llama_dir), EngineOptions(router_hysteresis=0.5), CPU)):
        pass


def test_options_are_checked():
    for options, match in ((EngineOptions(tier="ram"), "add --capacity"),
                           (EngineOptions(router_hysteresis=-1), "margin >= 0"),
                           (EngineOptions(capacity=0), "at least 1"),
                           (EngineOptions(max_seqs=0), "--max-seqs")):
        with pytest.raises(ReadmoeError, match=match):
            options.validate()


def test_decodes_first_reaches_the_scheduler_and_the_default_is_the_scheduler_s():
    from readmoe.serve.schedulers import make_scheduler

    assert EngineOptions().scheduler_options() == {}
    options = EngineOptions(scheduler="expert-aware", decodes_first=True)
    assert make_scheduler(options.scheduler, **options.scheduler_options()).decodes_first
    assert make_scheduler("cache-aware").decodes_first
    assert not make_scheduler("expert-aware").decodes_first
    with pytest.raises(ReadmoeError, match="does not take"):
        make_scheduler("fcfs", **EngineOptions(decodes_first=False).scheduler_options())


def test_enforce_eager_turns_the_cuda_graphs_off():
    args = argparse.ArgumentParser()
    add_engine_args(args)
    assert engine_options(args.parse_args([])).cuda_graphs
    assert not engine_options(args.parse_args(["--enforce-eager"])).cuda_graphs
