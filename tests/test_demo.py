"""The demo's folder naming and its handling of a training run begun on other weights."""

import json

import torch
from safetensors.torch import save_file

from readmoe.demo import (
    DEMO_IMPORTANCE,
    DEMO_REFIT,
    DEMO_SEQUENTIAL,
    carving_tag,
    parse_args,
    set_aside_stale_run,
)
from readmoe.refactor.fingerprint import tensors_fingerprint
from readmoe.train.rounds import STATE


def test_defaults_are_the_demo_carving_and_get_the_plain_folders():
    args = parse_args([])
    assert (args.importance, args.refit, args.sequential) == (DEMO_IMPORTANCE, DEMO_REFIT,
                                                              DEMO_SEQUENTIAL)
    assert carving_tag(args.importance, args.refit, args.sequential) == ""
    assert parse_args(["--no-refit"]).refit is False
    assert parse_args(["--sequential"]).sequential is True


def test_other_carvings_name_criterion_and_refit():
    assert carving_tag("activation", False) == "-activation"
    assert carving_tag("activation", True) == "-activation-refit"
    other = "activation" if DEMO_IMPORTANCE != "activation" else "weighted"
    assert carving_tag(other, DEMO_REFIT).startswith(f"-{other}")
    assert carving_tag(DEMO_IMPORTANCE, not DEMO_REFIT) == f"-{DEMO_IMPORTANCE}" + (
        "" if DEMO_REFIT else "-seqrefit" if DEMO_SEQUENTIAL else "-refit")
    assert carving_tag("activation", True, True) == "-activation-seqrefit"
    assert carving_tag(DEMO_IMPORTANCE, True, not DEMO_SEQUENTIAL).endswith(
        "-refit" if DEMO_SEQUENTIAL else "-seqrefit")
    assert carving_tag("activation", False, True) == "-activation"  # nothing to run in order


def _moe(folder, value):
    folder.mkdir()
    save_file({"w": torch.full((4, 4), float(value))}, str(folder / "model.safetensors"))
    return folder


def _run(out, moe, config=None):
    out.mkdir()
    state = {"source_weights": tensors_fingerprint(moe), "config": config or {"decay": 1.0}}
    (out / STATE).write_text(json.dumps(state))
    (out / "round-0").mkdir()
    return out


def test_a_run_from_the_same_weights_stays(tmp_path):
    moe = _moe(tmp_path / "moe", 1)
    out = _run(tmp_path / "train", moe)
    set_aside_stale_run(out, moe)
    assert (out / STATE).is_file()
    assert not list(tmp_path.glob("train-stale-*"))


def test_a_run_from_other_weights_is_moved_aside_not_deleted(tmp_path):
    old = _moe(tmp_path / "old", 1)
    new = _moe(tmp_path / "new", 2)
    out = _run(tmp_path / "train", old)
    set_aside_stale_run(out, new)
    assert not out.exists()
    assert (tmp_path / "train-stale-1" / "round-0").is_dir()
    _run(out, old)
    set_aside_stale_run(out, new)
    assert (tmp_path / "train-stale-2" / STATE).is_file()


def test_a_run_with_other_settings_is_moved_aside_the_same_settings_stay(tmp_path):
    moe = _moe(tmp_path / "moe", 1)
    out = _run(tmp_path / "train", moe, {"decay": 0.8})
    set_aside_stale_run(out, moe, {"decay": 0.8})
    assert (out / STATE).is_file()
    set_aside_stale_run(out, moe, {"decay": 1.0})
    assert not out.exists()
    assert (tmp_path / "train-stale-1" / "round-0").is_dir()


def test_no_training_yet_is_left_alone(tmp_path):
    moe = _moe(tmp_path / "moe", 1)
    set_aside_stale_run(tmp_path / "train", moe)
    assert not (tmp_path / "train").exists()


def test_targets_that_name_their_plan_go_along_to_the_fresh_run(tmp_path):
    """A dense pass per target block is the dear part of a rerun; the trainer checks the
    carried targets against the plan, so only targets that record theirs are carried."""
    moe = _moe(tmp_path / "moe", 1)
    out = _run(tmp_path / "train", moe, {"decay": 0.8})
    (out / "targets").mkdir()
    (out / "targets" / "targets.json").write_text(json.dumps({"plan_tensors": "abc"}))
    set_aside_stale_run(out, moe, {"decay": 1.0})
    assert json.loads((out / "targets" / "targets.json").read_text()) == {"plan_tensors": "abc"}
    assert sorted(p.name for p in out.iterdir()) == ["targets"]
    legacy = _run(tmp_path / "legacy", moe, {"decay": 0.8})
    (legacy / "targets").mkdir()
    (legacy / "targets" / "targets.json").write_text("{}")
    set_aside_stale_run(legacy, moe, {"decay": 1.0})
    assert not legacy.exists()
