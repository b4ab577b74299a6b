"""Shared fixtures: tiny random Llama-family models and a character tokenizer, no downloads."""

from __future__ import annotations

import string
from pathlib import Path

import pytest
import torch

CHARS = string.printable


def char_tokenizer():
    """A character-level fast tokenizer (vocabulary ~100) that needs no files."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in CHARS:
        vocab.setdefault(ch, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>")


def tiny_config(model_type: str = "llama", **overrides):
    from transformers import AutoConfig

    fields = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    fields.update(overrides)
    return AutoConfig.for_model(model_type, **fields)


def tiny_model(model_type: str = "llama", seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides)).eval()


ALPHABETS = {"digits": "0123456789 ", "lower": "abcdefghij ", "upper": "ABCDEFGHIJ "}


def write_alphabet_corpus(folder: Path, docs: int, length: int) -> Path:
    """Three domains whose documents use disjoint characters: routing by domain is easy."""
    import json
    import random

    folder.mkdir(parents=True)
    rng = random.Random(0)
    for domain, alphabet in ALPHABETS.items():
        texts = ["".join(rng.choice(alphabet) for _ in range(length)) for _ in range(docs)]
        (folder / f"{domain}.jsonl").write_text(
            "".join(json.dumps({"text": t}) + "\n" for t in texts))
    return folder


def refactor_tiny(tmp_path: Path, model_dir: Path, corpus_dir: Path) -> Path:
    """Statistics and a `readme` refactoring of a tiny model through the CLI."""
    from readmoe.cli import main

    stats = tmp_path / "stats"
    assert main(["stats", str(model_dir), "--corpus", str(corpus_dir), "--out", str(stats),
                 "--tokens", "256", "--block-size", "32"]) == 0
    out = tmp_path / "moe"
    assert main(["refactor", str(model_dir), "--corpus", str(corpus_dir), "--out", str(out),
                 "--stats", str(stats)]) == 0
    return out


@pytest.fixture
def tokenizer():
    return char_tokenizer()


@pytest.fixture
def tiny_llama_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "tiny-llama"
    tiny_model().save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True)
def _isolated_cache(request, tmp_path_factory, monkeypatch):
    """Unit tests get an empty cache; integration tests share the real one (one conversion)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if request.node.get_closest_marker("integration") is None:
        monkeypatch.setenv("READMOE_CACHE", str(tmp_path_factory.mktemp("readmoe-cache")))


def mlp_inputs(model: torch.nn.Module, blocks: torch.Tensor) -> dict[int, torch.Tensor]:
    """Each layer's FFN input `[B, T, H]` in ``model``'s forward over ``blocks``: what the
    statistics and importance references recompute the channels' activations from."""
    inputs = {}
    hooks = [layer.mlp.register_forward_pre_hook(
        lambda _m, args, i=i: inputs.__setitem__(i, args[0]))
        for i, layer in enumerate(model.model.layers)]
    try:
        model(blocks)
    finally:
        for hook in hooks:
            hook.remove()
    return inputs
