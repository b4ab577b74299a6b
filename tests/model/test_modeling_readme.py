"""The ReadME model on its own: routing, KV cache, generate(), expert_ids checks, config."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.nn import functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from readmoe.model import ExpertGroups, ReadMEConfig, ReadMEForCausalLM

NUM_EXPERTS = 3
VOCAB = 100


def tiny_config(**overrides) -> ReadMEConfig:
    fields = dict(vocab_size=VOCAB, hidden_size=64, dense_intermediate_size=128,
                  num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=128, initializer_range=0.1, num_experts=NUM_EXPERTS,
                  # shared + routed, routed only, shared only
                  shared_intermediate_sizes=[32, 0, 64], expert_intermediate_sizes=[16, 40, 0])
    fields.update(overrides)
    return ReadMEConfig(**fields)


def tiny_readme(seed: int = 0, **overrides) -> ReadMEForCausalLM:
    torch.manual_seed(seed)
    return ReadMEForCausalLM(tiny_config(**overrides)).eval()


def sample(seed: int = 0, batch: int = 2, seq: int = 9):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(3, VOCAB, (batch, seq), generator=gen),
            torch.randint(0, NUM_EXPERTS, (batch, seq), generator=gen))


def test_weight_names_and_shapes():
    shapes = {name: tuple(p.shape) for name, p in tiny_readme().state_dict().items()}
    assert shapes["model.layers.0.mlp.shared.gate_proj.weight"] == (32, 64)
    assert shapes["model.layers.0.mlp.shared.up_proj.weight"] == (32, 64)
    assert shapes["model.layers.0.mlp.shared.down_proj.weight"] == (64, 32)
    assert shapes["model.layers.0.mlp.experts.gate_proj"] == (NUM_EXPERTS, 16, 64)
    assert shapes["model.layers.0.mlp.experts.up_proj"] == (NUM_EXPERTS, 16, 64)
    assert shapes["model.layers.0.mlp.experts.down_proj"] == (NUM_EXPERTS, 64, 16)
    assert shapes["model.layers.1.mlp.experts.down_proj"] == (NUM_EXPERTS, 64, 40)
    assert not [name for name in shapes if name.startswith("model.layers.1.mlp.shared")]
    assert not [name for name in shapes if name.startswith("model.layers.2.mlp.experts")]
    assert shapes["model.layers.2.self_attn.k_proj.weight"] == (32, 64)
    assert shapes["lm_head.weight"] == (VOCAB, 64)


def test_expert_weights_are_initialised():
    experts = tiny_readme().model.layers[0].mlp.experts
    for param in (experts.gate_proj, experts.up_proj, experts.down_proj):
        assert torch.isfinite(param).all()
        assert 0.05 < float(param.detach().std()) < 0.2  # normal(0, initializer_range=0.1)


@torch.no_grad()
def test_grouped_ffn_equals_per_token_reference():
    mlp = tiny_readme().model.layers[0].mlp
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 7, 64, generator=gen)  # [B, T, H]
    expert_ids = torch.randint(0, NUM_EXPERTS, (2, 7), generator=gen)
    out = mlp(x, ExpertGroups.from_expert_ids(expert_ids, NUM_EXPERTS))
    for b in range(2):
        for t in range(7):
            e, token = int(expert_ids[b, t]), x[b, t]
            experts = mlp.experts
            routed = (F.silu(experts.gate_proj[e] @ token) * (experts.up_proj[e] @ token))
            expected = mlp.shared(token) + experts.down_proj[e] @ routed
            torch.testing.assert_close(out[b, t], expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_domain_expert_ids_equal_constant_per_token_ids():
    model = tiny_readme()
    input_ids, _ = sample()
    domains = torch.tensor([2, 0])
    per_token = domains[:, None].expand_as(input_ids)
    assert torch.equal(model(input_ids, expert_ids=domains).logits,
                       model(input_ids, expert_ids=per_token).logits)
    assert not torch.allclose(model(input_ids, expert_ids=domains).logits,
                              model(input_ids, expert_ids=torch.tensor([1, 0])).logits)


@torch.no_grad()
def test_kv_cached_incremental_forward_equals_full_forward():
    model = tiny_readme()
    input_ids, expert_ids = sample(seq=10)
    full = model(input_ids, expert_ids=expert_ids).logits  # [B, T, V]
    out = model(input_ids[:, :4], expert_ids=expert_ids[:, :4], use_cache=True)
    steps = [out.logits]
    cache = out.cache
    for start, end in [(4, 5), (5, 8), (8, 9), (9, 10)]:  # single tokens and a chunk
        out = model(input_ids[:, start:end], expert_ids=expert_ids[:, start:end], cache=cache,
                    use_cache=True)
        cache = out.cache
        steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_past_key_values_keyword_is_accepted():
    model = tiny_readme()
    input_ids, expert_ids = sample(seq=6)
    full = model(input_ids, expert_ids=expert_ids).logits
    first = model(input_ids[:, :5], expert_ids=expert_ids[:, :5], use_cache=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the old name is deprecated in transformers 5
        last = model(input_ids[:, 5:], expert_ids=expert_ids[:, 5:],
                     past_key_values=first.cache, use_cache=True)
    torch.testing.assert_close(last.logits[:, -1], full[:, -1], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def greedy_without_cache(model, prompt, expert_ids_for, steps):
    """Reference decoding: recompute the whole sequence for every new token."""
    tokens = prompt
    for _ in range(steps):
        logits = model(tokens, expert_ids=expert_ids_for(tokens.shape[1]), use_cache=False).logits
        tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tokens


GENERATE = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)


@torch.no_grad()
def test_generate_with_domain_routing_matches_full_recompute():
    model = tiny_readme()
    prompt, _ = sample(seq=5)
    domains = torch.tensor([1, 2])
    generated = model.generate(prompt, expert_ids=domains, **GENERATE)
    expected = greedy_without_cache(model, prompt, lambda n: domains, 10)
    assert torch.equal(generated, expected)


@torch.no_grad()
def test_generate_with_per_token_expert_ids():
    model = tiny_readme()
    prompt, _ = sample(seq=5)
    _, expert_ids = sample(seed=3, seq=15)  # covers the prompt and all 10 new tokens
    generated = model.generate(prompt, expert_ids=expert_ids, **GENERATE)
    expected = greedy_without_cache(model, prompt, lambda n: expert_ids[:, :n], 10)
    assert torch.equal(generated, expected)
    with pytest.raises(ValueError, match="cover the prompt and every new token"):
        model.generate(prompt, expert_ids=expert_ids[:, :5], **GENERATE)


@torch.no_grad()
def test_expert_ids_may_be_omitted_only_when_nothing_is_routed():
    input_ids, _ = sample()
    unrouted = tiny_readme(shared_intermediate_sizes=[64, 64, 64],
                           expert_intermediate_sizes=[0, 0, 0])
    assert unrouted(input_ids).logits.shape == (2, 9, VOCAB)
    single = tiny_readme(num_experts=1)
    assert torch.equal(single(input_ids).logits,
                       single(input_ids, expert_ids=torch.zeros_like(input_ids)).logits)
    with pytest.raises(ValueError, match="pass expert_ids"):
        tiny_readme()(input_ids)


@pytest.mark.parametrize(("expert_ids", "message"), [
    (torch.full((2, 9), NUM_EXPERTS), r"\[0, 3\)"),
    (torch.full((2,), -1), r"\[0, 3\)"),
    (torch.zeros(2, 8, dtype=torch.long), "shape"),
    (torch.zeros(3, dtype=torch.long), "shape"),
    (torch.zeros(2, 9, 1, dtype=torch.long), "shape"),
    (torch.zeros(2, 9), "integer"),
    (torch.zeros(2, 9, dtype=torch.bool), "integer"),
])
def test_bad_expert_ids_are_refused(expert_ids, message):
    input_ids, _ = sample()
    with pytest.raises(ValueError, match=message):
        tiny_readme()(input_ids, expert_ids=expert_ids)


def test_loss_matches_shifted_cross_entropy_and_only_used_experts_get_gradients():
    model = tiny_readme().train()
    input_ids, _ = sample()
    expert_ids = torch.where(input_ids % 2 == 0, 0, 2)  # expert 1 is never used
    out = model(input_ids, expert_ids=expert_ids, labels=input_ids)
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), input_ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    grad = model.model.layers[1].mlp.experts.gate_proj.grad  # [E, R, H]
    assert grad[0].abs().sum() > 0 and grad[2].abs().sum() > 0
    assert grad[1].abs().sum() == 0


@torch.no_grad()
def test_hidden_states_logits_to_keep_and_tied_embeddings():
    model = tiny_readme(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    input_ids, expert_ids = sample()
    out = model(input_ids, expert_ids=expert_ids, output_hidden_states=True, logits_to_keep=1)
    assert len(out.hidden_states) == 4
    assert out.logits.shape == (2, 1, VOCAB)


@pytest.mark.parametrize("backbone", ["mistral", "qwen2"])
@torch.no_grad()
def test_other_backbones_reuse_their_attention(backbone):
    model = tiny_readme(backbone_type=backbone, sliding_window=4)
    attn = model.model.layers[0].self_attn
    assert type(attn).__module__.endswith(f"modeling_{backbone}")
    assert (attn.q_proj.bias is not None) == (backbone == "qwen2")
    assert attn.o_proj.bias is None
    input_ids, expert_ids = sample(seq=10)
    full = model(input_ids, expert_ids=expert_ids).logits
    cached = model(input_ids[:, :9], expert_ids=expert_ids[:, :9], use_cache=True)
    last = model(input_ids[:, 9:], expert_ids=expert_ids[:, 9:], cache=cached.cache,
                 use_cache=True)
    torch.testing.assert_close(last.logits[:, 0], full[:, 9], rtol=1e-5, atol=1e-5)


def test_config_defaults_validation_and_round_trip():
    config = ReadMEConfig(num_hidden_layers=2, dense_intermediate_size=64)
    assert config.shared_intermediate_sizes == [64, 64]
    assert config.expert_intermediate_sizes == [0, 0]
    assert config.expert_names == ["expert_0"]
    assert config.layer_types == ["full_attention"] * 2
    assert not config.needs_routing and tiny_config().needs_routing
    restored = ReadMEConfig.from_dict(tiny_config(expert_names=["a", "b", "c"]).to_dict())
    assert restored.expert_names == ["a", "b", "c"]
    assert restored.expert_intermediate_sizes == [16, 40, 0]
    with pytest.raises(ValueError, match="expert_intermediate_sizes"):
        tiny_config(expert_intermediate_sizes=[16, 40])
    with pytest.raises(ValueError, match="not both 0"):
        tiny_config(shared_intermediate_sizes=[32, 0, 0])
    with pytest.raises(ValueError, match="expert_names"):
        tiny_config(expert_names=["only-one"])
    with pytest.raises(ValueError, match="backbone_type"):
        tiny_config(backbone_type="gpt2")
    with pytest.raises(ValueError, match="router_type"):
        tiny_config(router_type="magic")


def test_auto_classes_know_the_model():
    config = AutoConfig.for_model("readme", num_hidden_layers=1, dense_intermediate_size=32,
                                  hidden_size=32, num_attention_heads=2, vocab_size=50)
    assert isinstance(config, ReadMEConfig)
    assert isinstance(AutoModelForCausalLM.from_config(config), ReadMEForCausalLM)
