"""Write a dense Llama folder as an F32 GGUF file that llama.cpp loads, and count what a GGUF
model reads per decode step.

Why: the speed benchmark compares the engine with llama.cpp on the very same weights, and
llama.cpp only reads GGUF. Its converter (``convert_hf_to_gguf.py``) lives in llama.cpp's source
tree, not in an installed package, and wants the gguf-py of its own revision; for the Llama
architecture the layout is small enough to write here with the ``gguf`` package's
``GGUFWriter`` (already a dependency). The tokenizer is not rebuilt from HF files: the GGUF the
dense model came from (the built-in Q4_1 file) already carries llama.cpp's tokenizer fields,
copied as they are; the vocabulary sizes are checked to agree.

Layout, as the converter's ``LlamaModel`` writes it: HF names mapped to llama.cpp's
(``blk.N.attn_q.weight``, ...), each matrix ``[out, in]`` as stored, and the rows of q and k
permuted within each head from HF's rotate-half pairs (i, i + D/2) to the adjacent pairs
(2i, 2i + 1) llama.cpp's RoPE rotates. A tied LM head writes no ``output.weight``: llama.cpp then
uses ``token_embd.weight`` for it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from readmoe.errors import ReadmoeError

TOKENIZER_PREFIX = "tokenizer."
EMBEDDING = "token_embd.weight"
OUTPUT = "output.weight"


def llama_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """Rows of a q or k projection ``[heads * D, in]`` from HF's rotate-half order to the
    interleaved order of llama.cpp's RoPE (the converter's ``LlamaModel.permute``)."""
    rows = weight.shape[0]
    return (weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def source_gguf(spec: str) -> Path | None:
    """The GGUF file a dense model spec was converted from (a built-in name or a .gguf path),
    or None for a plain HF folder."""
    from readmoe.models.builtin import BUILTIN_MODELS, builtin_gguf_path

    if spec in BUILTIN_MODELS:
        return builtin_gguf_path(BUILTIN_MODELS[spec])
    path = Path(spec).expanduser()
    return path if path.is_file() and path.suffix == ".gguf" else None


def _rope_theta(config) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    kind = rope.get("rope_type", "default")
    if kind != "default":
        raise ReadmoeError(f"GGUF export writes plain RoPE only; this model uses {kind!r} "
                           "scaling")
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _copy_tokenizer(writer, tokenizer_gguf: Path, vocab_size: int) -> None:
    from gguf import GGUFReader, GGUFValueType

    fields = {name: field for name, field in GGUFReader(tokenizer_gguf).fields.items()
              if name.startswith(TOKENIZER_PREFIX)}
    if "tokenizer.ggml.tokens" not in fields:
        raise ReadmoeError(f"{tokenizer_gguf}: no tokenizer fields to copy")
    tokens = len(fields["tokenizer.ggml.tokens"].contents())
    if tokens != vocab_size:
        raise ReadmoeError(f"{tokenizer_gguf} has {tokens} tokens, the model {vocab_size}: "
                           "give the GGUF the model was converted from")
    for name, field in fields.items():
        kind = field.types[0]
        sub = field.types[-1] if kind == GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), kind, sub_type=sub)


def export_llama_gguf(model_dir: str | Path, out: str | Path, tokenizer_gguf: str | Path,
                      name: str | None = None) -> Path:
    """Write the dense Llama model in ``model_dir`` to ``out`` as an all-F32 GGUF (atomic),
    with the tokenizer fields of ``tokenizer_gguf``; returns ``out``."""
    import gguf
    import torch

    from readmoe.models import load_model

    model = load_model(str(model_dir), dtype=torch.float32)
    config = model.config
    if config.model_type != "llama":
        raise ReadmoeError(f"GGUF export writes the Llama architecture; {model_dir} is "
                           f"{config.model_type!r}")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ReadmoeError(f"{model_dir}: GGUF export writes bias-free Llama layers only")
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = model.model.layers[0].self_attn.head_dim
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    writer = gguf.GGUFWriter(tmp, "llama")
    try:
        writer.add_name(name or Path(model_dir).name)
        writer.add_file_type(gguf.LlamaFileType.ALL_F32)
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(heads)
        writer.add_head_count_kv(kv_heads)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(_rope_theta(config))
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_vocab_size(config.vocab_size)
        _copy_tokenizer(writer, Path(tokenizer_gguf), config.vocab_size)
        for tensor_name, array in _llama_tensors(model, heads, kv_heads):
            writer.add_tensor(tensor_name, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:
        writer.close()
        Path(tmp).unlink(missing_ok=True)
    return out


def _llama_tensors(model, heads: int, kv_heads: int):
    """(llama.cpp name, F32 array) of every weight, in the converter's layout."""

    def array(param) -> np.ndarray:
        return param.detach().float().cpu().numpy().copy()

    embed = model.model.embed_tokens.weight
    yield EMBEDDING, array(embed)
    yield "output_norm.weight", array(model.model.norm.weight)
    if model.lm_head.weight is not embed and not model.config.tie_word_embeddings:
        yield OUTPUT, array(model.lm_head.weight)
    for i, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        yield f"blk.{i}.attn_norm.weight", array(layer.input_layernorm.weight)
        yield f"blk.{i}.attn_q.weight", llama_permute(array(attn.q_proj.weight), heads)
        yield f"blk.{i}.attn_k.weight", llama_permute(array(attn.k_proj.weight), kv_heads)
        yield f"blk.{i}.attn_v.weight", array(attn.v_proj.weight)
        yield f"blk.{i}.attn_output.weight", array(attn.o_proj.weight)
        yield f"blk.{i}.ffn_norm.weight", array(layer.post_attention_layernorm.weight)
        yield f"blk.{i}.ffn_gate.weight", array(mlp.gate_proj.weight)
        yield f"blk.{i}.ffn_up.weight", array(mlp.up_proj.weight)
        yield f"blk.{i}.ffn_down.weight", array(mlp.down_proj.weight)


def gguf_step_weight_bytes(path: str | Path) -> int:
    """Weight bytes one decode step of a GGUF model reads: every tensor once, except the
    embedding, of which a step reads a row per token, unless it is also the (tied) LM head."""
    from gguf import GGUFReader

    tensors = GGUFReader(path).tensors
    tied = all(t.name != OUTPUT for t in tensors)
    return sum(int(t.n_bytes) for t in tensors if tied or t.name != EMBEDDING)


def gguf_precision(path: str | Path) -> str:
    """The tensor types of a GGUF file by their share of its bytes, e.g. "Q4_1 63%, Q8_0 31%"."""
    from gguf import GGUFReader

    shares: dict[str, int] = {}
    for tensor in GGUFReader(path).tensors:
        kind = tensor.tensor_type.name
        shares[kind] = shares.get(kind, 0) + int(tensor.n_bytes)
    total = sum(shares.values())
    return ", ".join(f"{kind} {size / total:.0%}"
                     for kind, size in sorted(shares.items(), key=lambda kv: -kv[1]))
