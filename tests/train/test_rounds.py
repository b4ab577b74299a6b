from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from readmoe.cli import main
from readmoe.errors import ReadmoeError
from readmoe.train.config import TrainConfig
from readmoe.train.rounds import Trainer

SMALL = ["--rounds", "2", "--router-steps", "3", "--expert-steps", "2", "--batch-size", "4",
         "--block-size", "32", "--eval-tokens", "64", "--hysteresis-tokens", "64",
         "--lr-router", "3e-3",
         "--lr-experts", "1e-3"]


def small_config(**overrides) -> TrainConfig:
    fields = dict(rounds=2, router_steps=3, expert_steps=2, batch_size=4, block_size=32,
                  eval_tokens=64, hysteresis_tokens=64, lr_router=3e-3, lr_experts=1e-3)
    fields.update(overrides)
    return TrainConfig(**fields)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_train_cli_writes_rounds_log_and_a_routed_model(tmp_path, tiny_moe_dir,
                                                        train_corpus_dir):
    out = tmp_path / "run"
    assert main(["train", str(tiny_moe_dir), "--corpus", str(train_corpus_dir), "--out",
                 str(out), *SMALL, "--decay", "0.8"]) == 0
    log = json.loads((out / "train_log.json").read_text())
    assert [r["round"] for r in log["rounds"]] == [0, 1]
    first = log["rounds"][0]
    assert len(first["router"]["losses"]) == 3 and len(first["experts"]["losses"]) == 2
    assert log["rounds"][1]["router"]["lr"] == pytest.approx(3e-3 * 0.8)
    accuracy = first["router_accuracy"]
    assert set(accuracy) == {"digits", "lower", "upper", "mean"}
    assert accuracy["mean"] == pytest.approx(sum(accuracy[d] for d in first["heldout"]) / 3)
    assert set(first["heldout"]) == {"digits", "lower", "upper"}
    from readmoe.models import load_model

    model = load_model(str(out / "round-1"))
    assert model.config.router_type == "pregating"
    ids = torch.randint(3, 60, (1, 10))
    out_ids = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out_ids.shape == (1, 14)


def test_router_training_learns_the_domain_experts(tmp_path, tiny_moe_dir, train_corpus_dir):
    """Domains use disjoint characters, so the oracle label is easy: accuracy must rise."""
    config = small_config(rounds=1, router_steps=40, expert_steps=0, lr_router=1e-2)
    state = Trainer(tiny_moe_dir, str(train_corpus_dir), tmp_path / "r", config).run()
    assert state["rounds"]["0"]["router_accuracy"]["mean"] > 0.6
    losses = state["rounds"]["0"]["router"]["losses"]
    assert losses[-1] < losses[0]


def test_resume_after_kill_gives_identical_weights(tmp_path, tiny_moe_dir, train_corpus_dir):
    config = small_config()
    straight = tmp_path / "straight"
    Trainer(tiny_moe_dir, str(train_corpus_dir), straight, config).run()
    killed = tmp_path / "killed"
    for stop in (1, 3):  # killed after the first router phase, then inside round 1
        Trainer(tiny_moe_dir, str(train_corpus_dir), killed, small_config()).run(max_phases=stop)
    Trainer(tiny_moe_dir, str(train_corpus_dir), killed, small_config()).run()
    a, b = weights(straight / "round-1"), weights(killed / "round-1")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_resume_with_other_arguments_is_refused(tmp_path, tiny_moe_dir, train_corpus_dir):
    out = tmp_path / "run"
    Trainer(tiny_moe_dir, str(train_corpus_dir), out, small_config()).run(max_phases=1)
    with pytest.raises(ReadmoeError, match=r"another config: rounds 2 \(now 3\).*delete"):
        Trainer(tiny_moe_dir, str(train_corpus_dir), out, small_config(rounds=3)).run()


def test_resume_from_a_recarved_source_is_refused(tmp_path, tiny_moe_dir, train_corpus_dir):
    """The same source folder carved again with other weights (another criterion, a refit):
    continuing the old run would silently train from the old weights."""
    import shutil

    from safetensors.torch import save_file

    source = tmp_path / "recarved"
    shutil.copytree(tiny_moe_dir, source)
    out = tmp_path / "run"
    Trainer(source, str(train_corpus_dir), out, small_config()).run(max_phases=1)
    tensors = weights(source)
    key = next(k for k in tensors if "down_proj" in k)
    tensors[key] = tensors[key] + 1e-3
    save_file(tensors, str(source / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ReadmoeError, match="carved again since"):
        Trainer(source, str(train_corpus_dir), out, small_config()).run()


def test_prune_baseline_trains_experts_only(tmp_path, tiny_llama_dir, train_corpus_dir):
    stats = tmp_path / "stats"
    main(["stats", str(tiny_llama_dir), "--corpus", str(train_corpus_dir), "--out", str(stats),
          "--tokens", "256", "--block-size", "32"])
    prune = tmp_path / "prune"
    main(["refactor", str(tiny_llama_dir), "--corpus", str(train_corpus_dir), "--out",
          str(prune), "--method", "prune", "--stats", str(stats)])
    state = Trainer(prune, str(train_corpus_dir), tmp_path / "run", small_config()).run()
    assert "router" not in state["rounds"]["0"]
    assert len(state["rounds"]["1"]["experts"]["losses"]) == 2


def test_layerwise_router_learns_the_domain_experts(tmp_path, tiny_moe_dir, train_corpus_dir):
    config = small_config(rounds=1, router_steps=40, expert_steps=0, lr_router=1e-2,
                          router_type="layerwise")
    state = Trainer(tiny_moe_dir, str(train_corpus_dir), tmp_path / "lw", config).run()
    assert state["rounds"]["0"]["router_accuracy"]["mean"] > 0.6
    losses = state["rounds"]["0"]["router"]["losses"]
    assert losses[-1] < losses[0]


def test_two_processes_with_accelerate_match_one(tmp_path, tiny_moe_dir, train_corpus_dir):
    pytest.importorskip("accelerate")
    single = tmp_path / "single"
    assert main(["train", str(tiny_moe_dir), "--corpus", str(train_corpus_dir), "--out",
                 str(single), *SMALL]) == 0
    double = tmp_path / "double"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--cpu",
               "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "-m", "readmoe.cli", "train", str(tiny_moe_dir),
               "--corpus", str(train_corpus_dir), "--out", str(double), *SMALL]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = weights(single / "round-1"), weights(double / "round-1")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


def test_reduced_dtype_autocasts_and_keeps_fp32_weights(tmp_path, tiny_moe_dir,
                                                        train_corpus_dir):
    """--dtype bfloat16 (CUDA's default) runs the forward passes under autocast: the saved
    weights stay fp32 and training still moves them (on CPU here; the same code on CUDA)."""
    out = tmp_path / "bf16"
    assert main(["train", str(tiny_moe_dir), "--corpus", str(train_corpus_dir), "--out",
                 str(out), *SMALL, "--rounds", "1", "--device", "cpu", "--dtype",
                 "bfloat16"]) == 0
    trained, source = weights(out / "round-0"), weights(tiny_moe_dir)
    assert {t.dtype for t in trained.values()} == {torch.float32}
    name = "model.layers.0.mlp.experts.up_proj"
    assert not torch.equal(trained[name], source[name])
    log = json.loads((out / "train_log.json").read_text())
    assert all(loss == loss for loss in log["rounds"][0]["router"]["losses"])  # no NaN


def test_recipe_auto_picks_small_below_a_billion_and_flags_override(tiny_moe_dir):
    from readmoe.cli.train_cmds import config_from_args
    from readmoe.models import load_config
    from readmoe.train.config import RECIPES, dense_parameters, recipe_for

    config = load_config(str(tiny_moe_dir))
    assert dense_parameters(config) < 1e9
    assert recipe_for("auto", config) == ("small", RECIPES["small"])
    big = type("C", (), {**config.to_dict(), "hidden_size": 4096, "num_hidden_layers": 32,
                         "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 128,
                         "dense_intermediate_size": 11008, "vocab_size": 32000,
                         "tie_word_embeddings": False})
    assert 6.5e9 < dense_parameters(big) < 7e9  # Llama-2-7B's shape
    assert recipe_for("auto", big) == ("paper", RECIPES["paper"])
    with pytest.raises(ReadmoeError, match="unknown recipe 'fast'"):
        recipe_for("fast", config)
    parser = __import__("argparse").ArgumentParser()
    commands = parser.add_subparsers()
    from readmoe.cli.train_cmds import register

    register(commands)
    base = ["train", str(tiny_moe_dir), "--corpus", "c", "--out", "o"]
    paper = config_from_args(parser.parse_args([*base, "--recipe", "paper"]))
    assert (paper.lr_router, paper.lr_experts, paper.kd_weight, paper.decay,
            paper.final_router_steps) == (5e-4, 5e-5, 0.0, 0.8, 0)
    mixed = config_from_args(parser.parse_args([*base, "--lr-experts", "1e-3"]))
    assert (mixed.lr_router, mixed.lr_experts, mixed.kd_weight, mixed.decay) == \
        (2e-3, 1e-3, 1.0, 1.0)
    decayed = config_from_args(parser.parse_args([*base, "--decay", "0.8"]))
    assert (decayed.lr_experts, decayed.decay, decayed.final_router_steps) == (2e-4, 0.8, 640)
    none = config_from_args(parser.parse_args([*base, "--final-router-steps", "0"]))
    assert none.final_router_steps == 0


def test_final_router_phase_trains_the_router_alone_after_the_last_round(
        tmp_path, tiny_moe_dir, train_corpus_dir):
    """Same rounds with and without the final phase: the backbone ends identical, the router
    moves, the phase is logged in the last round and scored with it."""
    plain = Trainer(tiny_moe_dir, str(train_corpus_dir), tmp_path / "plain",
                    small_config()).run()
    state = Trainer(tiny_moe_dir, str(train_corpus_dir), tmp_path / "final",
                    small_config(final_router_steps=6)).run()
    last = state["rounds"]["1"]
    assert len(last["router_final"]["losses"]) == 6
    assert last["router_final"]["lr"] == pytest.approx(3e-3 * 0.8)  # the last round's
    assert "router_final" not in state["rounds"]["0"]
    assert last["router_accuracy"] != plain["rounds"]["1"]["router_accuracy"]
    a, b = weights(tmp_path / "plain" / "round-1"), weights(tmp_path / "final" / "round-1")
    moved = {k for k in a if not torch.equal(a[k], b[k])}
    assert moved and all(k.startswith("model.router.") for k in moved), sorted(moved)[:5]
    first_a, first_b = (weights(tmp_path / d / "round-0") for d in ("plain", "final"))
    assert all(torch.equal(first_a[k], first_b[k]) for k in first_a)


def test_final_router_phase_alone_reads_targets_of_its_own(tmp_path, tiny_moe_dir,
                                                          train_corpus_dir):
    """No router steps in the rounds: the final phase still has target blocks to learn from."""
    config = small_config(rounds=1, router_steps=0, expert_steps=0, final_router_steps=40,
                          lr_router=1e-2)
    state = Trainer(tiny_moe_dir, str(train_corpus_dir), tmp_path / "r", config).run()
    assert state["rounds"]["0"]["router_accuracy"]["mean"] > 0.6


def test_a_run_begun_before_a_setting_existed_resumes_with_its_neutral_default(
        tmp_path, tiny_moe_dir, train_corpus_dir):
    out = tmp_path / "run"
    Trainer(tiny_moe_dir, str(train_corpus_dir), out, small_config()).run(max_phases=1)
    state = json.loads((out / "state.json").read_text())
    del state["config"]["final_router_steps"]
    (out / "state.json").write_text(json.dumps(state))
    Trainer(tiny_moe_dir, str(train_corpus_dir), out, small_config()).run()
    with pytest.raises(ReadmoeError, match=r"final_router_steps 0 \(now 3\)"):
        Trainer(tiny_moe_dir, str(train_corpus_dir), out,
                small_config(final_router_steps=3)).run()


def test_cached_targets_are_recomputed_when_the_plan_moved_channels(tmp_path, tiny_moe_dir,
                                                                   train_corpus_dir):
    """A recarve may keep the dense source (the plan's fingerprint) but move channels between
    experts: targets made on the old channels would teach the router the old experts."""
    import shutil

    from readmoe.refactor.plan import ExpertPlan
    from readmoe.train.targets import DistillTargets

    source = tmp_path / "moved"
    shutil.copytree(tiny_moe_dir, source)
    out = tmp_path / "run"
    Trainer(source, str(train_corpus_dir), out, small_config()).run(max_phases=0)
    before = DistillTargets.load(out / "targets")
    plan = ExpertPlan.load(source / "plan")
    layer = plan.layers[0]
    others = set(layer.experts[1:].flatten().tolist())
    column = next(i for i, c in enumerate(layer.experts[0].tolist()) if c not in others)
    shared, expert = int(layer.shared[0]), int(layer.experts[0, column])
    layer.shared[0], layer.experts[0, column] = expert, shared  # one channel changes sides
    layer.shared, _ = layer.shared.sort()
    layer.experts[0], _ = layer.experts[0].sort()
    plan.save(source / "plan")
    Trainer(source, str(train_corpus_dir), out, small_config()).run(max_phases=0)
    after = DistillTargets.load(out / "targets")
    assert after.meta["plan_tensors"] != before.meta["plan_tensors"]
    assert torch.equal(after.tokens, before.tokens)
    assert not torch.equal(after.scores, before.scores)
