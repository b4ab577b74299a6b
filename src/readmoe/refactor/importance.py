"""Channel importance: the per-domain score by which every planner ranks a layer's FFN channels.

Channel c of a layer adds ``a_c(x) * W_down[:, c]`` to the FFN output, so how much dropping it
changes the output depends on its activation *and* on its down-projection column:

- ``activation`` (the paper's, the default): mean |a_c| over a domain's tokens. It ignores
  the column, so a channel that fires strongly into a tiny column ranks high.
- ``weighted``: mean |a_c| * ||W_down[:, c]||, exactly the mean norm of the channel's output
  term, ``E ||a_c W_down[:, c]||``.
- ``contribution``: E[a_c^2] * ||W_down[:, c]||^2, the expected squared norm of that term: the
  error that dropping the channel alone adds to the output's mean squared error (cross terms
  aside), as Wanda/FLAP-style pruning measures it. Needs the statistics' mean squares.

Planners get the scores, never the raw statistics' ``mean_abs``, so ReadME experts and the
prune baseline are always carved by the same criterion.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from readmoe.errors import ReadmoeError
from readmoe.refactor.stats import ActivationStats

DEFAULT_CRITERION = "activation"
CRITERIA = ("activation", "weighted", "contribution")


@dataclass(frozen=True)
class Importance:
    """Scores ``domain -> [L, I]`` (float64) made by ``criterion``; planners rank by them."""

    criterion: str
    scores: dict[str, torch.Tensor]

    @property
    def domains(self) -> list[str]:
        return sorted(self.scores)

    @property
    def intermediate_size(self) -> int:
        return int(next(iter(self.scores.values())).shape[1])


def check_criterion(criterion: str, stats: ActivationStats | None = None) -> None:
    """Refuse an unknown criterion, or (given ``stats``) statistics that lack the field it
    needs, so an old statistics folder stops the run before any model is loaded."""
    if criterion not in CRITERIA:
        raise ReadmoeError(f"unknown importance criterion {criterion!r}; choose one of "
                           f"{', '.join(CRITERIA)}")
    if stats is None or criterion != "contribution":
        return  # every statistics folder holds mean |a| (it defines the domains)
    missing = [d for d in stats.domains if d not in stats.mean_sq]
    if missing:
        raise ReadmoeError(f"the statistics hold no mean squares for {', '.join(missing)} "
                           f"(computed by an older readmoe); --importance {criterion} needs "
                           "them: recompute the statistics with --recompute-stats")


def down_column_norms(dense) -> torch.Tensor:
    """``[L, I]`` float64: the L2 norm of each channel's down-projection column per layer."""
    return torch.stack([layer.mlp.down_proj.weight.detach().double().cpu().norm(dim=0)
                        for layer in dense.model.layers])


def channel_importance(stats: ActivationStats, criterion: str = DEFAULT_CRITERION,
                       dense=None) -> Importance:
    """Scores of ``criterion`` for every domain of ``stats``; ``dense`` (the model the
    statistics were computed on) gives the down-projection columns the other criteria need."""
    check_criterion(criterion, stats)
    if criterion == "activation":
        return Importance(criterion, {d: stats.mean_abs[d].double() for d in stats.domains})
    if dense is None:
        raise ReadmoeError(f"--importance {criterion} needs the dense model's down_proj weights")
    norms = down_column_norms(dense)
    if norms.shape != (stats.num_layers, stats.intermediate_size):
        raise ReadmoeError(f"the dense model's FFNs are {tuple(norms.shape)} (layers, channels), "
                           f"the statistics' {(stats.num_layers, stats.intermediate_size)}")
    if criterion == "weighted":
        scores = {d: stats.mean_abs[d].double() * norms for d in stats.domains}
    else:
        scores = {d: stats.mean_sq[d].double() * norms.square() for d in stats.domains}
    return Importance(criterion, scores)
