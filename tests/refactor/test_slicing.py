"""Slicing a dense model along a plan reproduces the dense model restricted to the plan's channels.

The reference is deliberately naive: the dense model itself, with every MLP multiplying
act(gate(x)) * up(x) by a per-token 0/1 channel mask (shared set plus the token's expert),
computed one token at a time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from readmoe.errors import ReadmoeError
from readmoe.model import ReadMEForCausalLM
from readmoe.refactor.plan import ExpertPlan, LayerPlan
from readmoe.refactor.slicing import save_readme, slice_dense
from tests.conftest import char_tokenizer, tiny_model

DENSE = 128  # tiny_config's intermediate_size
VOCAB = 128
# Larger weights than the default 0.02, so the FFN visibly moves the logits.
BACKBONES = {
    "llama": dict(model_type="llama", initializer_range=0.1, tie_word_embeddings=True),
    "qwen2": dict(model_type="qwen2", initializer_range=0.1, use_sliding_window=True,
                  sliding_window=4, max_window_layers=1),
    "mistral": dict(model_type="mistral", initializer_range=0.1, sliding_window=4),
}


def dense_model(backbone: str = "llama", seed: int = 0) -> nn.Module:
    return tiny_model(seed=seed, **BACKBONES[backbone])


def make_plan(shared: list[torch.Tensor], experts: list[torch.Tensor],
              num_experts: int) -> ExpertPlan:
    layers = [LayerPlan(s.sort().values, e.sort(dim=1).values)
              for s, e in zip(shared, experts, strict=True)]
    names = [f"domain{index}" for index in range(num_experts)]
    plan = ExpertPlan("test", "tiny", names, DENSE, 0.5, layers)
    plan.validate()
    return plan


def full_shared_plan(num_layers: int = 2, num_experts: int = 2) -> ExpertPlan:
    empty = torch.zeros(num_experts, 0, dtype=torch.long)
    return make_plan([torch.arange(DENSE)] * num_layers, [empty] * num_layers, num_experts)


def random_plan(seed: int, shared_sizes: list[int], expert_sizes: list[int],
                num_experts: int) -> ExpertPlan:
    """Random shared set and random disjoint equal-size experts, per layer."""
    gen = torch.Generator().manual_seed(seed)
    shared, experts = [], []
    for s, r in zip(shared_sizes, expert_sizes, strict=True):
        perm = torch.randperm(DENSE, generator=gen)
        shared.append(perm[:s])
        experts.append(perm[s:s + num_experts * r].view(num_experts, r))
    return make_plan(shared, experts, num_experts)


class MaskedMLP(nn.Module):
    """The dense gated MLP with a per-token channel mask, one token at a time."""

    def __init__(self, mlp: nn.Module, masks: torch.Tensor):
        super().__init__()
        self.mlp = mlp
        self.masks = masks  # [B, T, D] 0/1

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, H]
        out = torch.empty_like(x)
        for b in range(x.shape[0]):
            for t in range(x.shape[1]):
                token = x[b, t]  # [H]
                hidden = self.mlp.act_fn(self.mlp.gate_proj(token)) * self.mlp.up_proj(token)
                out[b, t] = self.mlp.down_proj(hidden * self.masks[b, t])
        return out


@torch.no_grad()
def masked_dense_logits(dense: nn.Module, plan: ExpertPlan, input_ids: torch.Tensor,
                        expert_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                        ) -> torch.Tensor:
    originals = [layer.mlp for layer in dense.model.layers]
    try:
        for layer, lp in zip(dense.model.layers, plan.layers, strict=True):
            masks = torch.zeros(*input_ids.shape, DENSE)  # [B, T, D]
            masks[..., lp.shared] = 1.0
            for b in range(input_ids.shape[0]):
                for t in range(input_ids.shape[1]):
                    masks[b, t, lp.experts[expert_ids[b, t]]] = 1.0
            layer.mlp = MaskedMLP(layer.mlp, masks)
        return dense(input_ids, attention_mask=attention_mask).logits
    finally:
        for layer, mlp in zip(dense.model.layers, originals, strict=True):
            layer.mlp = mlp


def sample_ids(seed: int, batch: int = 2, seq: int = 10, num_experts: int = 3):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(3, VOCAB, (batch, seq), generator=gen),
            torch.randint(0, num_experts, (batch, seq), generator=gen))


@pytest.mark.parametrize("backbone", list(BACKBONES))
@torch.no_grad()
def test_full_shared_plan_equals_dense(backbone):
    dense = dense_model(backbone)
    model = slice_dense(dense, full_shared_plan())
    assert model.config.backbone_type == backbone
    input_ids, _ = sample_ids(0)
    # No expert_ids needed: nothing is routed.
    torch.testing.assert_close(model(input_ids).logits, dense(input_ids).logits)


@torch.no_grad()
def test_expert_plan_matches_masked_dense_and_differs_from_dense():
    dense = dense_model("llama")
    plan = random_plan(1, shared_sizes=[32, 32], expert_sizes=[32, 32], num_experts=3)
    model = slice_dense(dense, plan)
    input_ids, expert_ids = sample_ids(1)
    logits = model(input_ids, expert_ids=expert_ids).logits
    reference = masked_dense_logits(dense, plan, input_ids, expert_ids)
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
    # The mask matters (the test would be vacuous if the FFN did not move the logits).
    assert (logits - dense(input_ids).logits).abs().max() > 1e-2


@pytest.mark.parametrize("backbone", list(BACKBONES))
@pytest.mark.parametrize("seed", [0, 1])
@torch.no_grad()
def test_random_plans_match_masked_dense(backbone, seed):
    gen = torch.Generator().manual_seed(100 + seed)
    num_experts = int(torch.randint(1, 5, (1,), generator=gen))
    # Layer 0 has no shared channels; layer 1 has both parts, of random sizes.
    expert_sizes = [DENSE // (2 * num_experts), int(torch.randint(1, 16, (1,), generator=gen))]
    shared_sizes = [0, int(torch.randint(0, DENSE - num_experts * expert_sizes[1], (1,),
                                         generator=gen))]
    plan = random_plan(seed, shared_sizes, expert_sizes, num_experts)
    dense = dense_model(backbone, seed=seed)
    model = slice_dense(dense, plan)
    input_ids, expert_ids = sample_ids(seed, num_experts=num_experts)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :3] = 0  # left padding
    logits = model(input_ids, attention_mask=attention_mask, expert_ids=expert_ids).logits
    reference = masked_dense_logits(dense, plan, input_ids, expert_ids, attention_mask)
    torch.testing.assert_close(logits[0, 3:], reference[0, 3:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits[1], reference[1], rtol=1e-5, atol=1e-5)


def test_sliced_weights_are_channel_selections():
    dense = dense_model("llama")
    plan = random_plan(2, shared_sizes=[40, 0], expert_sizes=[20, 32], num_experts=4)
    model = slice_dense(dense, plan)
    names = set(model.state_dict())
    assert "model.layers.0.mlp.shared.gate_proj.weight" in names
    assert not any(name.startswith("model.layers.1.mlp.shared.") for name in names)
    mlp, dense_mlp = model.model.layers[0].mlp, dense.model.layers[0].mlp
    lp = plan.layers[0]
    assert torch.equal(mlp.shared.down_proj.weight, dense_mlp.down_proj.weight[:, lp.shared])
    assert mlp.experts.gate_proj.shape == (4, 20, 64)
    assert mlp.experts.down_proj.shape == (4, 64, 20)
    assert torch.equal(mlp.experts.up_proj[2], dense_mlp.up_proj.weight[lp.experts[2]])
    assert torch.equal(mlp.experts.down_proj[3], dense_mlp.down_proj.weight[:, lp.experts[3]])
    assert model.config.expert_names == plan.expert_names
    assert model.config.shared_intermediate_sizes == [40, 0]
    assert model.config.expert_intermediate_sizes == [20, 32]
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as in the dense model


def test_slice_refuses_mismatched_or_unsupported_models():
    dense = dense_model("llama")
    with pytest.raises(ReadmoeError, match="plan has 3 layers"):
        slice_dense(dense, full_shared_plan(num_layers=3))
    narrow = tiny_model(intermediate_size=96)
    with pytest.raises(ReadmoeError, match="FFN width 128"):
        slice_dense(narrow, full_shared_plan())
    with pytest.raises(ReadmoeError, match="mlp_bias"):
        slice_dense(tiny_model(mlp_bias=True), full_shared_plan())
    gpt2 = tiny_model(model_type="gpt2", n_embd=64, n_layer=2, n_head=4)
    with pytest.raises(ReadmoeError, match="not supported"):
        slice_dense(gpt2, full_shared_plan())


GENERATE = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)


def _subprocess_run(folder, tmp_path) -> dict:
    """Load the folder in a fresh interpreter (remote code, offline) and run it."""
    script = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        inputs = torch.load({str(tmp_path / "inputs.pt")!r})
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True)
        model.eval()
        with torch.no_grad():
            logits = model(inputs["input_ids"], expert_ids=inputs["expert_ids"]).logits
        generated = model.generate(inputs["prompt"], expert_ids=inputs["domains"],
                                   **inputs["generate"])
        torch.save({{"logits": logits, "generated": generated, "class": type(model).__module__,
                    "readmoe_imported": "readmoe" in sys.modules}},
                   {str(tmp_path / "outputs.pt")!r})
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"),
               PYTHONPATH="")
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, env=env,
                   timeout=300)
    return torch.load(tmp_path / "outputs.pt")


@torch.no_grad()
def test_save_load_round_trip_and_generate(tmp_path):
    dense = dense_model("llama")
    plan = random_plan(3, shared_sizes=[32, 48], expert_sizes=[32, 16], num_experts=3)
    model = slice_dense(dense, plan)
    folder = save_readme(model, tmp_path / "readme-model", tokenizer=char_tokenizer(), plan=plan)

    files = {path.name for path in folder.iterdir()}
    assert {"config.json", "model.safetensors", "configuration_readme.py", "modeling_readme.py",
            "tokenizer.json", "plan"} <= files
    assert not [name for name in files if name.endswith(".bin")]
    assert all(path.stat().st_mode & 0o044 == 0o044 for path in folder.rglob("*"))  # shareable
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".")]  # no temp left
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_readme.ReadMEConfig",
        "AutoModelForCausalLM": "modeling_readme.ReadMEForCausalLM"}
    saved_plan = ExpertPlan.load(folder / "plan")
    assert all(torch.equal(a.experts, b.experts)
               for a, b in zip(saved_plan.layers, plan.layers, strict=True))

    input_ids, expert_ids = sample_ids(3)
    prompt = input_ids[:, :5]
    domains = torch.tensor([2, 0])
    logits = model(input_ids, expert_ids=expert_ids).logits
    generated = model.generate(prompt, expert_ids=domains, **GENERATE)
    assert generated.shape == (2, 15)

    reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()  # in-process: registered class
    assert isinstance(reloaded, ReadMEForCausalLM)
    assert torch.equal(reloaded(input_ids, expert_ids=expert_ids).logits, logits)
    assert torch.equal(reloaded.generate(prompt, expert_ids=domains, **GENERATE), generated)

    torch.save({"input_ids": input_ids, "expert_ids": expert_ids, "prompt": prompt,
                "domains": domains, "generate": GENERATE}, tmp_path / "inputs.pt")
    remote = _subprocess_run(folder, tmp_path)
    assert remote["class"].startswith("transformers_modules")
    assert not remote["readmoe_imported"]
    assert torch.equal(remote["logits"], logits)
    assert torch.equal(remote["generated"], generated)


@torch.no_grad()
def test_generate_with_full_shared_plan_matches_dense(tmp_path):
    dense = dense_model("llama")
    model = slice_dense(dense, full_shared_plan())
    folder = save_readme(model, tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    prompt, _ = sample_ids(4, seq=6)
    expected = dense.generate(prompt, **GENERATE)
    assert torch.equal(reloaded.generate(prompt, expert_ids=torch.tensor([1, 0]), **GENERATE),
                       expected)
    assert torch.equal(reloaded.generate(prompt, **GENERATE), expected)
    attention_mask = torch.ones_like(prompt)
    attention_mask[1, :2] = 0  # left padding
    padded = dict(GENERATE, attention_mask=attention_mask)
    assert torch.equal(reloaded.generate(prompt, expert_ids=torch.tensor([0, 1]), **padded),
                       dense.generate(prompt, **padded))


def test_save_readme_replaces_only_model_folders(tmp_path):
    model = slice_dense(dense_model("llama"), full_shared_plan())
    folder = save_readme(model, tmp_path / "m")
    (folder / "stale.txt").write_text("from an earlier save")
    save_readme(model, folder)  # a ReadME folder is replaced as a whole
    assert not (folder / "stale.txt").exists()
    assert (folder / "model.safetensors").is_file()
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(ReadmoeError, match="not a ReadME model folder"):
        save_readme(model, other)
    assert (other / "keep.txt").read_text() == "mine"
