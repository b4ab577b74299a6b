"""The real built-in model: its config, and that it models Python far better than chance."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
import torch

from readmoe.data.tokens import pack_blocks
from readmoe.eval.perplexity import window_nll
from readmoe.models import load_model, load_tokenizer, model_info

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def default_model():
    return load_model("smollm2-135m"), load_tokenizer("smollm2-135m")


def test_default_model_config():
    info = model_info("smollm2-135m")
    assert info["architecture"] == "LlamaForCausalLM"
    assert (info["layers"], info["hidden_size"], info["intermediate_size"]) == (30, 576, 1536)
    assert (info["heads"], info["kv_heads"], info["vocab_size"]) == (9, 3, 49152)
    assert info["tie_word_embeddings"] and info["dtype"] == "f32"
    assert 134_000_000 < info["parameters"] < 135_000_000


def test_python_source_perplexity_far_below_random_model(default_model):
    model, tokenizer = default_model
    source = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text()
    blocks = pack_blocks(tokenizer, [source], block_size=256, max_tokens=1024)
    trained = window_nll(model, blocks).ppl
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    random_model = AutoModelForCausalLM.from_config(model.config).eval()
    untrained = window_nll(random_model, blocks).ppl
    assert trained < 20
    assert untrained > 100 * trained
