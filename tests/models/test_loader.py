from __future__ import annotations

import json

import pytest
import torch

from readmoe.cli import main
from readmoe.errors import ReadmoeError
from readmoe.models import load_model, model_info, resolve_model


def test_loads_hf_folder_and_matches_saved_logits(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    model = load_model(str(tiny_llama_dir))
    ids = torch.randint(0, 128, (2, 12))
    torch.testing.assert_close(model(ids).logits, reference(ids).logits)
    assert model.dtype == torch.float32


def test_loaded_models_never_fetch_hub_kernels(tiny_llama_dir):
    """transformers kernelizes a model by default and, once it trains on a GPU, downloads
    the kernels from the Hub: an offline H100 failed `readmoe train --device cuda` there."""
    model = load_model(str(tiny_llama_dir))
    assert not model.use_kernels
    model.train()  # the mode switch that kernelizes
    assert not model.use_kernels


def test_model_info_reads_headers(tiny_llama_dir):
    info = model_info(str(tiny_llama_dir))
    assert info["architecture"] == "LlamaForCausalLM"
    assert (info["layers"], info["hidden_size"], info["intermediate_size"]) == (2, 64, 128)
    assert (info["heads"], info["kv_heads"], info["vocab_size"]) == (4, 2, 128)
    from transformers import AutoModelForCausalLM

    expected = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).num_parameters()
    assert info["parameters"] == expected
    assert info["dtype"] == "f32"


@pytest.mark.parametrize("model_type", ["mistral", "qwen2"])
def test_other_llama_family_architectures_load(tmp_path, model_type):
    from tests.conftest import tiny_model

    folder = tmp_path / model_type
    tiny_model(model_type).save_pretrained(folder)
    assert model_info(str(folder))["model_type"] == model_type


def test_refuses_gpt2_naming_the_architecture(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(
        folder)
    with pytest.raises(ReadmoeError, match="unsupported architecture gpt2.*GPT2LMHeadModel"):
        load_model(str(folder))


def test_missing_path_is_one_clear_error(tmp_path):
    with pytest.raises(ReadmoeError, match="not found"):
        resolve_model(str(tmp_path / "nope"))


def test_corrupted_safetensors_refused(tiny_llama_dir):
    weights = tiny_llama_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ReadmoeError, match="corrupted safetensors"):
        load_model(str(tiny_llama_dir))


def test_pickled_weights_refused(tiny_llama_dir):
    weights = tiny_llama_dir / "model.safetensors"
    weights.rename(tiny_llama_dir / "pytorch_model.bin")
    with pytest.raises(ReadmoeError, match="refuses pickles"):
        load_model(str(tiny_llama_dir))


@pytest.mark.parametrize("damage", ["missing", "gpt2", "corrupt"])
def test_cli_prints_one_line_not_a_traceback(tmp_path, tiny_llama_dir, capsys, damage):
    if damage == "missing":
        target = tmp_path / "missing"
    elif damage == "gpt2":
        target = tmp_path / "gpt2"
        target.mkdir()
        (target / "config.json").write_text(json.dumps(
            {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    else:
        target = tiny_llama_dir
        (target / "model.safetensors").write_bytes(b"not a safetensors file")
    assert main(["model", "info", str(target)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("readmoe: error: ") and "\n" not in err
    assert "Traceback" not in err


def test_model_info_cli_json(tiny_llama_dir, capsys):
    assert main(["model", "info", str(tiny_llama_dir)]) == 0
    assert json.loads(capsys.readouterr().out)["layers"] == 2


def test_gguf_file_is_converted_once(tmp_path, monkeypatch):
    from readmoe.models import convert

    calls = []

    def fake_convert(path, out):
        calls.append(path)
        out.mkdir(parents=True, exist_ok=True)
        return out

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr("readmoe.models.loader.convert_gguf", fake_convert)
    first = resolve_model(str(gguf))
    assert first == convert.gguf_cache_folder(gguf)
    assert calls == [gguf]


def test_a_readme_folders_tokenizer_loads_first_without_asking_to_run_its_code(tmp_path):
    # a fresh process, the tokenizer before any model: transformers must already know the
    # `readme` type, or it asks on stdin whether to run the folder's own modelling code
    import subprocess
    import sys

    from tests.server.helpers import save_tiny_model

    folder = save_tiny_model(tmp_path / "readme")
    code = ("import sys; from readmoe.models import load_tokenizer; "
            f"print(load_tokenizer({str(folder)!r})('ab')['input_ids'])")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         stdin=subprocess.DEVNULL, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "custom code" not in run.stderr
    assert run.stdout.strip().startswith("[")
