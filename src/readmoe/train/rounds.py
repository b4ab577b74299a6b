"""Alternating rounds of router distillation and expert tuning (Read-ME section 4).

Round r: `router_steps` router steps at lr_router * decay**r, then `expert_steps` expert steps
at lr_experts * decay**r, each phase with its own cosine schedule; the last round ends with
`final_router_steps` more router steps (experts fixed); then a pre-gating model's routing
hysteresis is chosen (``hysteresis_margins``, train/hysteresis.py) before the last round is
scored and saved. The
data position advances across rounds and wraps around the router's target blocks. After
every phase, and every `checkpoint_every` optimizer steps inside one, a checkpoint folder
`checkpoint-<phases done>-<step>/` (the model, plus `training.pt`: AdamW's state and the
RNG's) is written whole, then `state.json`, which names it, is replaced atomically: a kill at
any moment leaves a complete checkpoint named, and the resumed run ends with the same weights
as an uninterrupted one, bit for bit. After every round the model is saved as `round-<r>/`
and `train_log.json` gains the round's losses, router accuracy and held-out perplexity.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import time
from pathlib import Path

import torch

from readmoe.errors import ReadmoeError
from readmoe.io import atomic_write_bytes, atomic_write_json
from readmoe.models.device import Placement, resolve_placement
from readmoe.refactor.fingerprint import tensors_fingerprint
from readmoe.train.config import DEFAULT_CHECKPOINT_EVERY, TrainConfig
from readmoe.train.data import BlockSchedule, blocks_per_domain, mixed_blocks
from readmoe.train.evaluate import RoundEvaluator
from readmoe.train.phases import Distributed, PhaseProgress, run_expert_phase, run_router_phase
from readmoe.train.targets import DistillTargets, build_targets

STATE = "state.json"
CHECKPOINT = "checkpoint"  # the prefix of checkpoint-<phases done>-<step>/
TRAINING_STATE = "training.pt"
RESUME_KEYS = ("config", "source", "source_weights", "corpus")  # a run resumes only if all match


class Trainer:
    """``placement``: where training runs. The trained model keeps fp32 weights on its device
    (AdamW's updates would round away in bf16); a reduced dtype autocasts the forward passes
    and holds the frozen dense teacher. It is not part of the run's state: a run resumes on
    another device with the same data order. Nor is ``checkpoint_every`` (0: only at phase
    boundaries), which changes where a kill resumes, never the result."""

    def __init__(self, moe_dir: str | Path, corpus_spec: str, out: str | Path,
                 config: TrainConfig, dense: str | None = None,
                 placement: Placement | None = None,
                 checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY) -> None:
        config.validate()
        if checkpoint_every < 0:
            raise ReadmoeError(f"--checkpoint-every must be >= 0, got {checkpoint_every}")
        self.checkpoint_every = checkpoint_every
        self.placement = placement or resolve_placement()
        self.moe_dir, self.out, self.config = Path(moe_dir), Path(out), config
        self.corpus_spec, self.dense_spec = corpus_spec, dense
        self.dist = Distributed()
        if config.batch_size % self.dist.world:
            raise ReadmoeError(f"--batch-size {config.batch_size} must be divisible by the "
                               f"number of processes ({self.dist.world})")

    def phases(self) -> list[tuple[str, int]]:
        """The phase sequence: (router, 0), (experts, 0), (router, 1), ..., (router_final, last)
        (empty ones left out)."""
        order = []
        for r in range(self.config.rounds):
            if self.routed and self.config.router_steps:
                order.append(("router", r))
            if self.config.expert_steps:
                order.append(("experts", r))
        if self.routed and self.config.final_router_steps:
            order.append(("router_final", self.config.rounds - 1))
        return order

    def run(self, max_phases: int | None = None) -> dict:
        """Train (resuming if `out` holds a matching state); `max_phases` stops early, as a
        kill at a phase boundary would (used by tests)."""
        from readmoe.data.corpus import load_corpus
        from readmoe.models import load_model, load_tokenizer
        from readmoe.refactor.plan import ExpertPlan

        torch.manual_seed(self.config.seed)
        self.plan = ExpertPlan.load(self._plan_dir())
        self.corpus = load_corpus(self.corpus_spec)
        self.tokenizer = load_tokenizer(str(self.moe_dir))
        state = self._load_state()
        checkpoint = self._checkpoint_dir(state)
        model = load_model(str(checkpoint or self.moe_dir), dtype=torch.float32,
                           device=self.placement.device)
        saved = self._training_state(checkpoint)
        self.routed = model.config.needs_routing
        if self.routed and model.config.router_type == "none":
            model.attach_router(self.config.router_type)
        dense = self._dense_model(load_model)
        schedule = BlockSchedule(self._blocks(), self.config.batch_size)
        targets = self._targets(dense, schedule) if self.routed else None
        router_schedule = (BlockSchedule(targets.tokens, self.config.batch_size)
                           if targets is not None else None)
        evaluator = RoundEvaluator(self.corpus, self.tokenizer, self.config, dense, self.plan)
        for index, (kind, r) in enumerate(self.phases()):
            if index < state["phases_done"]:
                continue
            if max_phases is not None and index >= max_phases:
                return state
            progress = self._progress(model, state, saved)
            saved = None  # restored once, where the checkpoint was taken
            started = time.time()
            if kind == "router":
                lr = self.config.lr_router * self.config.decay**r
                losses = run_router_phase(model, router_schedule, targets,
                                          r * self.config.router_steps, lr, self.config,
                                          self.dist, self.placement.autocast, progress)
            elif kind == "router_final":
                lr, losses = final_router_phase(model, targets, self.config, self.dist,
                                                self.placement.autocast, progress)
            else:
                lr = self.config.lr_experts * self.config.decay**r
                losses = run_expert_phase(model, schedule, r * self.config.expert_steps, lr,
                                          self.config, self.dist,
                                          dense if self.config.kd_weight > 0 else None,
                                          self.placement.autocast, progress)
            entry = state["rounds"].setdefault(str(r), {"round": r})
            entry[kind] = {"lr": lr, "losses": losses, "seconds": round(time.time() - started, 1)}
            last_phase = index == len(self.phases()) - 1
            if not last_phase and self.phases()[index + 1][1] != r and self.dist.is_main:
                entry.update(evaluator.evaluate(model))
                self._save_model(model, self.out / f"round-{r}")
            state.update(phases_done=index + 1, phase_step=0, phase_losses=[])
            self._checkpoint(model, state)
        if not state.get("finished") and self.dist.is_main:
            self._finish(model, state, evaluator)
        self.dist.barrier()
        return state

    def _finish(self, model, state: dict, evaluator: RoundEvaluator) -> None:
        """The last round: choose the routing hysteresis the model ships with (pre-gating),
        score the round with it and save it. A step of its own after the last checkpoint, so
        a kill here, or a run finished before it existed, redoes only this."""
        from readmoe.train.hysteresis import choose_margin

        last = self.config.rounds - 1
        entry = state["rounds"].setdefault(str(last), {"round": last})
        margins = self.config.hysteresis_margins
        if model.config.router_type == "pregating" and any(margins):
            per_domain = blocks_per_domain(self.corpus, self._blocks_needed())
            entry["hysteresis"] = choose_margin(
                model, self.corpus, self.tokenizer, margins=margins,
                trained_tokens=per_domain * self.config.block_size, window=evaluator.window,
                tokens=self.config.hysteresis_tokens, heldout=evaluator.blocks)
            print(f"routing hysteresis: margin {entry['hysteresis']['chosen']:g} (lowest "
                  f"perplexity of {', '.join(f'{m:g}' for m in margins)})", flush=True)
        entry.update(evaluator.evaluate(model))
        self._save_model(model, self.out / f"round-{last}")
        state["finished"] = True
        atomic_write_json(self.out / STATE, state)
        self._write_log(state)

    def _progress(self, model, state: dict, saved: dict | None) -> PhaseProgress:
        """The next phase's progress: fresh, or (right after a resume) the checkpoint's RNG,
        and inside a phase its steps done, losses and optimizer state."""
        def save(step: int, optimizer: torch.optim.Optimizer, losses: list[float]) -> None:
            state.update(phase_step=step, phase_losses=list(losses))
            self._checkpoint(model, state, optimizer)

        progress = PhaseProgress(every=self.checkpoint_every, save=save)
        if saved is not None:
            torch.set_rng_state(saved["rng"])
            if saved["cuda_rng"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(saved["cuda_rng"])
            progress.step, progress.losses = state["phase_step"], state["phase_losses"]
            progress.optimizer_state = saved["optimizer"]
        return progress

    def _plan_dir(self) -> Path:
        plan_dir = self.moe_dir / "plan"
        if not plan_dir.is_dir():
            raise ReadmoeError(f"{self.moe_dir} has no plan/ folder; train a folder written by "
                               "`readmoe refactor`")
        return plan_dir

    def _dense_model(self, load_model):
        from readmoe.models import resolve_model
        from readmoe.refactor.fingerprint import model_fingerprint

        source = self.dense_spec or self.plan.model
        expected = self.plan.meta.get("fingerprint")
        if expected and model_fingerprint(resolve_model(source)) != expected:
            raise ReadmoeError(f"{source} is not the dense model {self.moe_dir} was carved from;"
                               " pass the right one with --dense")
        return load_model(source, dtype=self.placement.dtype, device=self.placement.device)

    def _blocks_needed(self) -> int:
        """Training blocks to cut, an equal share from every domain (`blocks_per_domain`)."""
        c = self.config
        return (c.rounds * max(c.router_steps, c.expert_steps) or c.final_router_steps
                ) * c.batch_size

    def _blocks(self) -> torch.Tensor:
        return mixed_blocks(self.corpus, self.tokenizer, self.config.block_size,
                            self._blocks_needed())

    def _targets(self, dense, schedule: BlockSchedule) -> DistillTargets:
        """Distillation targets for the blocks router phases read (cached in `out`)."""
        from readmoe.refactor.oracle import OracleRouter

        folder = self.out / "targets"
        c = self.config
        # the final phase wraps around the rounds' blocks: a target block costs a dense
        # forward pass, a router step on it a small fraction of one
        count = min(schedule.blocks.shape[0],
                    (c.rounds * c.router_steps or c.final_router_steps) * c.batch_size)
        blocks = schedule.blocks[:count]
        meta = {"plan_fingerprint": self.plan.meta.get("fingerprint"),
                "plan_tensors": plan_tensors_fingerprint(self._plan_dir())}
        if (folder / "targets.json").is_file():
            cached = DistillTargets.load(folder)
            # targets cached before the plan's channels were recorded are taken to be on them
            same_plan = (cached.meta.get("plan_fingerprint") == meta["plan_fingerprint"]
                         and cached.meta.get("plan_tensors", meta["plan_tensors"])
                         == meta["plan_tensors"])
            if same_plan and cached.tokens.shape[0] >= count and torch.equal(
                    cached.tokens[:count], blocks):
                return DistillTargets(cached.tokens[:count], cached.scores[:count],
                                      cached.expert_sizes, cached.meta)
        targets = build_targets(OracleRouter(dense, self.plan), blocks, meta=meta)
        if self.dist.is_main:
            targets.save(folder)
        return targets

    def _load_state(self) -> dict:
        fresh = {"config": self.config.to_dict(), "source": str(self.moe_dir),
                 "source_weights": tensors_fingerprint(self.moe_dir),
                 "corpus": self.corpus.fingerprint(), "phases_done": 0, "phase_step": 0,
                 "phase_losses": [], "rounds": {}}
        path = self.out / STATE
        if not path.is_file():
            if self.out.is_dir() and any(p.name != "targets" for p in self.out.iterdir()):
                raise ReadmoeError(f"{self.out} is not empty and holds no training state; "
                                   "choose another --out")
            return fresh
        state = json.loads(path.read_text())
        state.setdefault("source_weights", fresh["source_weights"])  # begun before it was kept
        what = resume_mismatch(state, {key: fresh[key] for key in RESUME_KEYS}, self.moe_dir)
        if what is not None:
            raise ReadmoeError(f"{self.out} holds a run with another {what}; resume with the "
                               f"same arguments, or delete {self.out} or choose another --out "
                               "to start afresh")
        return state

    def _checkpoint_dir(self, state: dict) -> Path | None:
        """The checkpoint `state` names; a run begun before mid-phase checkpoints kept its
        phase-boundary one in `checkpoint/`."""
        if "checkpoint" in state:
            return self.out / state["checkpoint"]
        state.setdefault("phase_step", 0)
        state.setdefault("phase_losses", [])
        return self.out / CHECKPOINT if state["phases_done"] else None

    @staticmethod
    def _training_state(checkpoint: Path | None) -> dict | None:
        path = checkpoint / TRAINING_STATE if checkpoint else None
        if path is None or not path.is_file():
            return None
        return torch.load(path, map_location="cpu", weights_only=True)

    def _checkpoint(self, model, state: dict, optimizer: torch.optim.Optimizer | None = None
                    ) -> None:
        """Write a new checkpoint folder, then the state naming it (the commit point), then
        drop older checkpoints: at no moment is the named checkpoint incomplete."""
        name = f"{CHECKPOINT}-{state['phases_done']}-{state['phase_step']}"
        state["checkpoint"] = name
        if self.dist.is_main:
            folder = self.out / name
            self._save_model(model, folder)
            buffer = io.BytesIO()
            torch.save({"optimizer": optimizer.state_dict() if optimizer else None,
                        "rng": torch.get_rng_state(),
                        "cuda_rng": (torch.cuda.get_rng_state_all()
                                     if torch.cuda.is_available() else None)}, buffer)
            atomic_write_bytes(folder / TRAINING_STATE, buffer.getvalue())
            atomic_write_json(self.out / STATE, state)
            self._write_log(state)
            for old in self.out.glob(f"{CHECKPOINT}*"):
                if old.is_dir() and old.name != name:
                    shutil.rmtree(old)
        self.dist.barrier()

    def _write_log(self, state: dict) -> None:
        log = {"config": state["config"], "source": state["source"],
               "rounds": [state["rounds"][k] for k in sorted(state["rounds"], key=int)]}
        atomic_write_json(self.out / "train_log.json", log)

    def _save_model(self, model, folder: Path) -> None:
        from readmoe.refactor.slicing import save_readme

        save_readme(model, folder, tokenizer=self.tokenizer, plan=self.plan)


def plan_tensors_fingerprint(plan_dir: str | Path) -> str:
    """Hash of a plan's channel lists, whole (a few hundred KiB): the router's targets are
    each expert's share of the dense output, so they hold only for the plan they were made on,
    and a recarve may keep the dense source (the plan's own fingerprint) but move channels."""
    return tensors_fingerprint(plan_dir, sample=1 << 40)


def final_router_phase(model, targets: DistillTargets, config: TrainConfig,
                       dist: Distributed | None = None, precision=contextlib.nullcontext,
                       progress: PhaseProgress | None = None) -> tuple[float, list[float]]:
    """The run's last phase: ``config.final_router_steps`` router steps after the last round
    (experts fixed), at the last round's router learning rate, reading the target blocks on
    from where the rounds left off (wrapping around them). Returns (lr, losses). Public so
    that a benchmark can finish a kept round of a longer run the way a run of that many rounds
    would end."""
    lr = config.lr_router * config.decay ** (config.rounds - 1)
    losses = run_router_phase(model, BlockSchedule(targets.tokens, config.batch_size), targets,
                              config.rounds * config.router_steps, lr, config,
                              dist or Distributed(), precision, progress,
                              config.final_router_steps)
    return lr, losses


def resume_mismatch(kept: dict, current: dict, moe_dir: str | Path) -> str | None:
    """What a kept training state was begun with that ``current`` (some of RESUME_KEYS) no
    longer matches, worded for a message (each setting that moved, for the config), or None."""
    for key, wanted in current.items():
        if key == "config":  # a setting added since the run began had its neutral default
            defaults = TrainConfig().to_dict()
            kept = {**kept, key: {**{k: defaults[k] for k in wanted if k in defaults},
                                  **kept[key]}}
        if kept[key] == wanted:
            continue
        if key == "source_weights":
            return f"source: {moe_dir} was carved again since (other weights)"
        if key == "config":  # name each setting that moved, e.g. an older default
            return "config: " + ", ".join(f"{k} {kept[key].get(k)} (now {wanted[k]})"
                                          for k in wanted if kept[key].get(k) != wanted[k])
        return key
    return None


def stale_run_reason(out: str | Path, moe_dir: str | Path, config: dict | None = None
                     ) -> str | None:
    """Why ``out`` holds a run a ``Trainer`` would refuse to resume from ``moe_dir`` (begun on
    other weights or, given ``config``, with other settings), or None when it may resume or
    there is none (a run from before weights or settings were recorded is taken to be on the
    same, as the trainer takes it)."""
    path = Path(out) / STATE
    if not path.is_file():
        return None
    state = json.loads(path.read_text())
    current = {"source_weights": tensors_fingerprint(moe_dir)}
    state.setdefault("source_weights", current["source_weights"])
    if config is not None and "config" in state:
        current["config"] = config
    return resume_mismatch(state, current, moe_dir)


def final_model_dir(out: str | Path) -> Path:
    """The last round's folder of a finished run."""
    rounds = sorted(Path(out).glob("round-*"), key=lambda p: int(p.name.split("-")[1]))
    if not rounds:
        raise ReadmoeError(f"{out} holds no finished round")
    return rounds[-1]


def clear_checkpoint(out: str | Path) -> None:
    """Drop the checkpoints of a finished run (the round folders stay)."""
    for folder in Path(out).glob(f"{CHECKPOINT}*"):
        shutil.rmtree(folder, ignore_errors=True)
