"""Checkpoints inside a phase (issue 13, item 2): a run killed mid-phase and resumed ends
with exactly the weights of an uninterrupted run (model, AdamW state, RNG, data position)."""

from __future__ import annotations

import json

import pytest
import torch

import readmoe.train.phases as phases
import readmoe.train.rounds as rounds
from readmoe.errors import ReadmoeError
from readmoe.train.rounds import Trainer
from tests.train.test_rounds import small_config, weights


class Killed(Exception):
    """Stands for a SIGKILL: raised mid-loop, nothing after it runs."""


def config():
    return small_config(router_steps=5, expert_steps=4)


def kill_at_step(monkeypatch, step: int) -> None:
    """Raise `Killed` when the `step`-th optimizer step of this process is about to start."""
    real, calls = phases.cosine, []

    def cosine(base: float, at: int, total: int) -> float:
        calls.append(at)
        if len(calls) == step:
            raise Killed
        return real(base, at, total)

    monkeypatch.setattr(phases, "cosine", cosine)


def train(moe, corpus, out, every: int = 2) -> dict:
    return Trainer(moe, str(corpus), out, config(), checkpoint_every=every).run()


@pytest.fixture
def straight(tmp_path, tiny_moe_dir, train_corpus_dir):
    out = tmp_path / "straight"
    train(tiny_moe_dir, train_corpus_dir, out, every=0)
    return weights(out / "round-1")


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_kill_mid_phase_then_resume_gives_identical_weights(tmp_path, tiny_moe_dir,
                                                            train_corpus_dir, straight,
                                                            monkeypatch):
    out = tmp_path / "killed"
    # step 4 of router phase 0 (checkpoint after step 2), then step 3 of expert phase 1
    for step in (4, 3 + 5 + 4 + 3):
        with monkeypatch.context() as patch:
            kill_at_step(patch, step)
            with pytest.raises(Killed):
                train(tiny_moe_dir, train_corpus_dir, out)
        state = json.loads((out / "state.json").read_text())
        assert state["phase_step"] == 2 and len(state["phase_losses"]) == 2
        assert (out / state["checkpoint"] / rounds.TRAINING_STATE).is_file()
        assert [p.name for p in out.glob("checkpoint*")] == [state["checkpoint"]]
    final = train(tiny_moe_dir, train_corpus_dir, out)
    assert_same(straight, weights(out / "round-1"))
    assert len(final["rounds"]["0"]["router"]["losses"]) == 5
    assert len(final["rounds"]["1"]["experts"]["losses"]) == 4


def test_resume_without_the_optimizer_state_would_differ(tmp_path, tiny_moe_dir,
                                                         train_corpus_dir, straight,
                                                         monkeypatch):
    """The check above can fail: dropping AdamW's moments at the resume changes the weights."""
    out = tmp_path / "killed"
    with monkeypatch.context() as patch:
        kill_at_step(patch, 4)
        with pytest.raises(Killed):
            train(tiny_moe_dir, train_corpus_dir, out)
    real = rounds.Trainer._training_state
    monkeypatch.setattr(rounds.Trainer, "_training_state", staticmethod(
        lambda folder: {**real(folder), "optimizer": None}))
    train(tiny_moe_dir, train_corpus_dir, out)
    resumed = weights(out / "round-1")
    assert any(not torch.equal(straight[k], resumed[k]) for k in straight)


def test_kill_while_writing_the_state_resumes_from_the_previous_checkpoint(
        tmp_path, tiny_moe_dir, train_corpus_dir, straight, monkeypatch):
    out = tmp_path / "killed"
    real, writes = rounds.atomic_write_json, []

    def write(path, obj):
        if path.name == rounds.STATE:
            writes.append(path)
            if len(writes) == 2:  # the new checkpoint folder is complete, its state is not
                raise Killed
        real(path, obj)

    with monkeypatch.context() as patch:
        patch.setattr(rounds, "atomic_write_json", write)
        with pytest.raises(Killed):
            train(tiny_moe_dir, train_corpus_dir, out)
    state = json.loads((out / "state.json").read_text())
    assert state["checkpoint"] == "checkpoint-0-2"
    train(tiny_moe_dir, train_corpus_dir, out)
    assert_same(straight, weights(out / "round-1"))


def test_negative_checkpoint_interval_is_refused(tmp_path, tiny_moe_dir, train_corpus_dir):
    with pytest.raises(ReadmoeError, match="--checkpoint-every"):
        train(tiny_moe_dir, train_corpus_dir, tmp_path / "r", every=-1)


def test_kill_inside_the_final_router_phase_resumes_exactly(tmp_path, tiny_moe_dir,
                                                            train_corpus_dir, monkeypatch):
    final = small_config(router_steps=5, expert_steps=4, final_router_steps=5)
    out, straight = tmp_path / "killed", tmp_path / "straight"
    Trainer(tiny_moe_dir, str(train_corpus_dir), straight, final, checkpoint_every=0).run()
    with monkeypatch.context() as patch:
        kill_at_step(patch, 2 * (5 + 4) + 4)  # step 4 of the final phase
        with pytest.raises(Killed):
            Trainer(tiny_moe_dir, str(train_corpus_dir), out, final, checkpoint_every=2).run()
    state = json.loads((out / "state.json").read_text())
    assert (state["phases_done"], state["phase_step"]) == (4, 2)
    Trainer(tiny_moe_dir, str(train_corpus_dir), out, final, checkpoint_every=2).run()
    assert_same(weights(straight / "round-1"), weights(out / "round-1"))
