"""The two alternating phases: router distillation (backbone frozen) and expert tuning
(router frozen). Each phase builds a fresh AdamW with a cosine schedule over its own steps,
so a phase is a pure function of (weights, data position, learning rate); inside a phase,
`PhaseProgress` checkpoints add the optimizer's state and the steps done, so a run resumed
mid-phase is identical to an uninterrupted one too."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from readmoe.train.config import TrainConfig
from readmoe.train.data import BlockSchedule
from readmoe.train.losses import lm_loss, logit_kl, router_distillation_loss
from readmoe.train.targets import DistillTargets

Precision = Callable[[], contextlib.AbstractContextManager]


@dataclass
class PhaseProgress:
    """Where a phase stands and how it checkpoints: ``step`` optimizer steps done (with their
    ``losses`` and the AdamW ``optimizer_state`` after them; 0 and None for a fresh phase),
    and ``save(step, optimizer, losses)`` called after every ``every``-th step short of the
    phase's end (0: never; the phase's end is the caller's checkpoint)."""

    every: int = 0
    save: Callable[[int, torch.optim.Optimizer, list[float]], None] | None = None
    step: int = 0
    losses: list[float] = field(default_factory=list)
    optimizer_state: dict | None = None


def router_parameter_names(model) -> set[str]:
    """Names of the router's parameters (pre-gating router or layer-wise gates)."""
    router = {id(p) for p in model.router_parameters()}
    return {name for name, p in model.named_parameters() if id(p) in router}


def expert_parameter_names(model, scope: str) -> set[str]:
    router = router_parameter_names(model)
    names = set()
    for name, _ in model.named_parameters():
        if name in router:
            continue
        if scope == "all" or ".mlp." in name:
            names.add(name)
    return names


def set_trainable(model, names: set[str]) -> list[torch.nn.Parameter]:
    params = []
    for name, param in model.named_parameters():
        param.requires_grad_(name in names)
        if name in names:
            params.append(param)
    return params


def cosine(base: float, step: int, total: int) -> float:
    return base * 0.5 * (1.0 + math.cos(math.pi * step / max(1, total)))


class Distributed:
    """Data-parallel helpers over torch.distributed (as set up by `accelerate launch`);
    a no-op in a single process. Gradients are averaged by hand, so phases with different
    trainable parameters need no wrapper rebuilt."""

    def __init__(self) -> None:
        dist = torch.distributed
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
            from accelerate import PartialState

            PartialState()  # joins the process group `accelerate launch` describes
        self.active = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.active else 0
        self.world = dist.get_world_size() if self.active else 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        return batch[self.rank :: self.world]

    def average_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        if not self.active:
            return
        for param in params:
            if param.grad is not None:
                torch.distributed.all_reduce(param.grad)
                param.grad /= self.world

    def mean(self, value: float) -> float:
        if not self.active:
            return value
        tensor = torch.tensor([value], dtype=torch.float64)
        torch.distributed.all_reduce(tensor)
        return float(tensor) / self.world

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()


def _optimizer(params: list[torch.nn.Parameter], lr: float, config: TrainConfig):
    return torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay,
                             betas=(0.9, 0.95))


def router_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Pre-gating: `[B, T, E]` from the token ids alone (the backbone never runs);
    layer-wise: `[B, T, L, E]` from a forward pass that records every layer's gate."""
    if model.config.router_type == "pregating":
        return model.route(input_ids)[1]
    return model(input_ids=input_ids, output_router_logits=True).router_logits


def _run_phase(model, names: set[str], lr: float, steps: int, desc: str, config: TrainConfig,
               dist: Distributed, step_loss, precision: Precision,
               progress: PhaseProgress | None = None) -> list[float]:
    """The loop both phases share: train only `names` for `steps` AdamW steps under a cosine
    schedule from `lr`, averaging gradients over processes; `step_loss(step)` gives the loss,
    computed under `precision()` (autocast on a reduced dtype; the weights stay fp32).
    ``progress`` resumes the phase after its last checkpoint and writes new ones."""
    progress = progress or PhaseProgress()
    params = set_trainable(model, names)
    optimizer = _optimizer(params, lr, config)
    if progress.optimizer_state is not None:
        optimizer.load_state_dict(progress.optimizer_state)
    losses = list(progress.losses)
    model.train()
    for step in tqdm(range(progress.step, steps), desc=desc, disable=not dist.is_main,
                     leave=False, initial=progress.step, total=steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine(lr, step, steps)
        with precision():
            loss = step_loss(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        dist.average_gradients(params)
        optimizer.step()
        losses.append(dist.mean(float(loss.detach())))
        done = step + 1
        if progress.save is not None and progress.every and done % progress.every == 0 \
                and done < steps:
            progress.save(done, optimizer, losses)
    model.eval()
    set_trainable(model, set())
    return losses


def run_router_phase(model, schedule: BlockSchedule, targets: DistillTargets, first_step: int,
                     lr: float, config: TrainConfig, dist: Distributed,
                     precision: Precision = contextlib.nullcontext,
                     progress: PhaseProgress | None = None,
                     steps: int | None = None) -> list[float]:
    """``steps`` router steps (default ``config.router_steps``) from router-schedule position
    ``first_step``."""
    device = next(model.parameters()).device

    def step_loss(step: int) -> torch.Tensor:
        rows = dist.shard(schedule.indices(first_step + step))
        input_ids = targets.tokens[rows].to(device)  # [b, T]
        logits = router_logits(model, input_ids)  # [b, T, E] or [b, T, L, E]
        scores = targets.scores[rows].to(torch.int32).to(device).flatten(0, 1)  # [b*T, L, E]
        return router_distillation_loss(logits.flatten(0, 1), scores, targets.expert_sizes,
                                        config.router_loss)

    return _run_phase(model, router_parameter_names(model), lr,
                      config.router_steps if steps is None else steps, "router", config, dist,
                      step_loss, precision, progress)


def run_expert_phase(model, schedule: BlockSchedule, first_step: int, lr: float,
                     config: TrainConfig, dist: Distributed, dense=None,
                     precision: Precision = contextlib.nullcontext,
                     progress: PhaseProgress | None = None) -> list[float]:
    device = next(model.parameters()).device

    def step_loss(step: int) -> torch.Tensor:
        input_ids = dist.shard(schedule.batch(first_step + step)).to(device)  # [b, T]
        logits = model(input_ids=input_ids).logits  # the model routes with its frozen router
        loss = lm_loss(logits, input_ids)
        if dense is not None and config.kd_weight > 0:
            with torch.no_grad():
                teacher = dense(input_ids=input_ids).logits
            loss = loss + config.kd_weight * logit_kl(logits, teacher)
        return loss

    return _run_phase(model, expert_parameter_names(model, config.expert_params), lr,
                      config.expert_steps, "experts", config, dist, step_loss, precision,
                      progress)
