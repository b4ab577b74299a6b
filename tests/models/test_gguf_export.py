"""The F32 GGUF writer: every weight read back exactly in llama.cpp's layout, the metadata
llama.cpp needs, the tokenizer fields copied, and the bytes a decode step reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from readmoe.errors import ReadmoeError
from readmoe.models.gguf_export import (
    export_llama_gguf,
    gguf_precision,
    gguf_step_weight_bytes,
    llama_permute,
)
from tests.conftest import char_tokenizer, tiny_model

VOCAB = 128


def tokenizer_gguf(path: Path, tokens: int = VOCAB) -> Path:
    """A GGUF file holding only tokenizer fields, as the built-in model's file does."""
    import gguf

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"t{i}" for i in range(tokens)])
    writer.add_token_types([1] * tokens)
    writer.add_token_merges(["t 1", "t 2"])
    writer.add_bos_token_id(1)
    writer.add_add_bos_token(False)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def saved(tmp_path: Path, **overrides) -> tuple[object, Path]:
    model = tiny_model("llama", seed=4, vocab_size=VOCAB, **overrides)
    folder = tmp_path / "dense"
    model.save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return model, folder


def read(path: Path):
    import gguf

    reader = gguf.GGUFReader(path)
    return reader, {t.name: np.array(t.data) for t in reader.tensors}


def test_the_permutation_moves_rotate_half_pairs_next_to_each_other():
    heads, dim = 3, 8
    weight = np.arange(heads * dim * 2, dtype=np.float32).reshape(heads * dim, 2)
    permuted = llama_permute(weight, heads)
    for h in range(heads):
        for i in range(dim // 2):  # HF rotates row i with row i + D/2; llama.cpp 2i with 2i+1
            assert (permuted[h * dim + 2 * i] == weight[h * dim + i]).all()
            assert (permuted[h * dim + 2 * i + 1] == weight[h * dim + i + dim // 2]).all()


def test_every_weight_reads_back_exactly_in_llama_cpp_layout(tmp_path):
    model, folder = saved(tmp_path)
    out = export_llama_gguf(folder, tmp_path / "dense-f32.gguf", tokenizer_gguf(tmp_path / "t"))
    _, tensors = read(out)
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    dim = config.hidden_size // heads
    expected = {"token_embd.weight": model.model.embed_tokens.weight,
                "output_norm.weight": model.model.norm.weight,
                "output.weight": model.lm_head.weight}
    names = {"attn_norm": "input_layernorm", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    for i, layer in enumerate(model.model.layers):
        for gguf_name, hf_name in names.items():
            expected[f"blk.{i}.{gguf_name}.weight"] = layer.get_submodule(hf_name).weight
        for gguf_name, proj, count in (("attn_q", layer.self_attn.q_proj, heads),
                                       ("attn_k", layer.self_attn.k_proj, kv_heads)):
            hf = proj.weight.detach().numpy()
            got = tensors[f"blk.{i}.{gguf_name}.weight"]
            assert got.shape == hf.shape and got.dtype == np.float32
            for h in range(count):
                rows = hf[h * dim:(h + 1) * dim]
                pairs = np.stack([rows[:dim // 2], rows[dim // 2:]], axis=1).reshape(dim, -1)
                assert np.array_equal(got[h * dim:(h + 1) * dim], pairs)
    assert set(tensors) == set(expected) | {f"blk.{i}.attn_{p}.weight"
                                            for i in range(len(model.model.layers))
                                            for p in "qk"}
    for name, param in expected.items():
        want = param.detach().numpy()
        assert tensors[name].dtype == np.float32 and tensors[name].shape == want.shape, name
        assert np.array_equal(tensors[name], want), name


def test_metadata_and_tokenizer_fields(tmp_path):
    model, folder = saved(tmp_path)
    source = tokenizer_gguf(tmp_path / "t")
    out = export_llama_gguf(folder, tmp_path / "m.gguf", source, name="tiny")
    reader, _ = read(out)
    value = {name: field.contents() for name, field in reader.fields.items()}
    config = model.config
    assert value["general.architecture"] == "llama" and value["general.name"] == "tiny"
    assert value["general.file_type"] == 0  # all F32
    assert value["llama.block_count"] == config.num_hidden_layers
    assert value["llama.embedding_length"] == config.hidden_size
    assert value["llama.feed_forward_length"] == config.intermediate_size
    assert value["llama.attention.head_count"] == config.num_attention_heads
    assert value["llama.attention.head_count_kv"] == config.num_key_value_heads
    assert value["llama.rope.dimension_count"] == config.hidden_size // config.num_attention_heads
    assert value["llama.rope.freq_base"] == pytest.approx(config.rope_parameters["rope_theta"])
    assert value["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(config.rms_norm_eps)
    assert value["llama.context_length"] == config.max_position_embeddings
    assert value["llama.vocab_size"] == VOCAB
    copied = {name: field.contents() for name, field in read(source)[0].fields.items()
              if name.startswith("tokenizer.")}
    assert len(copied) == 6 and all(value[name] == v for name, v in copied.items())


def test_a_tied_head_is_the_embedding_and_counts_as_read(tmp_path):
    tied_model, folder = saved(tmp_path, tie_word_embeddings=True)
    out = export_llama_gguf(folder, tmp_path / "tied.gguf", tokenizer_gguf(tmp_path / "t"))
    reader, tensors = read(out)
    assert "output.weight" not in tensors
    every = sum(int(t.n_bytes) for t in reader.tensors)
    assert gguf_step_weight_bytes(out) == every  # the embedding is read whole, as the head
    assert gguf_precision(out) == "F32 100%"
    untied = export_llama_gguf(saved(tmp_path / "u")[1], tmp_path / "untied.gguf",
                               tokenizer_gguf(tmp_path / "t2"))
    embedding = VOCAB * tied_model.config.hidden_size * 4
    untied_total = sum(int(t.n_bytes) for t in read(untied)[0].tensors)
    assert gguf_step_weight_bytes(untied) == untied_total - embedding


def test_a_tokenizer_of_another_size_is_refused(tmp_path):
    _, folder = saved(tmp_path)
    with pytest.raises(ReadmoeError, match="100 tokens, the model 128"):
        export_llama_gguf(folder, tmp_path / "m.gguf", tokenizer_gguf(tmp_path / "t", 100))
    assert not (tmp_path / "m.gguf").exists() and not list(tmp_path.glob(".m.gguf.*"))


def test_other_architectures_are_refused(tmp_path):
    model = tiny_model("qwen2", seed=1, vocab_size=VOCAB)
    model.save_pretrained(tmp_path / "qwen")
    with pytest.raises(ReadmoeError, match="Llama architecture"):
        export_llama_gguf(tmp_path / "qwen", tmp_path / "q.gguf", tokenizer_gguf(tmp_path / "t"))
