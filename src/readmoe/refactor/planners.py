"""Expert planners: how a layer's FFN channels are split into a shared and routed experts.

Every planner uses the same shared set as the paper's method (channels every domain keeps)
and the same routed-expert size, so quality differences come from *which* channels form the
experts, at equal active width:

Channels are ranked by a per-domain importance (``refactor/importance.py``; default the
paper's mean |act|), the same for every planner:

- ``readme`` (the paper): per domain keep exactly round(keep * I) channels by importance
  (ties broken by channel index; the authors' strict '>' threshold kept one channel too few);
  shared = intersection over domains; expert d = domain mask minus shared.
- ``cluster`` (MoEfication-like): balanced k-means of the non-shared channels' importance
  profiles across domains gives E centroids; expert e = the R non-shared channels most
  important along centroid e's domain mix (the profile's projection on it). Assignment
  compares directions (which domains a channel serves), but centroids are mean raw profiles
  and experts are filled by projection, so magnitude counts: a cluster keeps its strong
  channels rather than weak ones of the same direction (the earlier normalised clustering
  did not, and came out below ``random``). Experts are not tied to domains; with one-hot
  centroids this is exactly ``readme``.
- ``random``: the non-shared channels in a seeded random order, expert e = the R channels
  from position e * R on (wrapping), so channels are used evenly; the lower bound.
- ``prune``: no routing; one mask of shared + R channels ranked by importance averaged over
  domains (each scaled by its mean, so each domain weighs the same). The dense
  structured-pruning baseline with exactly the MoE's active width.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from readmoe.errors import ReadmoeError
from readmoe.refactor.importance import Importance, channel_importance
from readmoe.refactor.plan import ExpertPlan, LayerPlan
from readmoe.refactor.stats import ActivationStats

KMEANS_ITERATIONS = 30


def top_channels(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the `count` largest scores, ties to the lower index, sorted ascending."""
    order = torch.sort(-scores.double(), stable=True).indices
    return order[:count].sort().values


def domain_masks(importance: Importance, layer: int, keep: float) -> torch.Tensor:
    """`[D, I]` bool: each domain's kept channels at `layer`."""
    size = importance.intermediate_size
    count = round(keep * size)
    masks = torch.zeros(len(importance.domains), size, dtype=torch.bool)
    for d, domain in enumerate(importance.domains):
        masks[d, top_channels(importance.scores[domain][layer], count)] = True
    return masks


def shared_and_routed(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shared = intersection of the masks; routed = each mask minus shared: `[S]`, `[D, R]`."""
    shared_mask = masks.all(dim=0)
    shared = shared_mask.nonzero().flatten()
    routed = torch.stack([(m & ~shared_mask).nonzero().flatten() for m in masks])
    return shared, routed


class Planner(ABC):
    name: ClassVar[str]

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def plan(self, stats: ActivationStats, keep: float = 0.5,
             importance: Importance | None = None) -> ExpertPlan:
        """The plan of every layer, ranked by ``importance`` (computed from ``stats``;
        default the paper's mean |act|), which the plan records."""
        check_request(stats, keep)
        importance = importance or channel_importance(stats)
        if importance.domains != stats.domains:
            raise ReadmoeError(f"importance scores cover {importance.domains}, the statistics "
                               f"{stats.domains}")
        layers = [self.plan_layer(importance, layer, keep)
                  for layer in range(stats.num_layers)]
        plan = ExpertPlan(method=self.name, model=stats.model, expert_names=self.names(stats),
                          intermediate_size=stats.intermediate_size, keep=keep, layers=layers,
                          meta={"fingerprint": stats.fingerprint, "seed": self.seed,
                                "stats_tokens": stats.tokens},
                          importance=importance.criterion)
        plan.validate()
        return plan

    def names(self, stats: ActivationStats) -> list[str]:
        return [f"expert{i}" for i in range(len(stats.domains))]

    @abstractmethod
    def plan_layer(self, importance: Importance, layer: int, keep: float) -> LayerPlan:
        """The shared set and routed experts of one layer."""


class ReadMEPlanner(Planner):
    name = "readme"

    def names(self, stats: ActivationStats) -> list[str]:
        return list(stats.domains)

    def plan_layer(self, importance: Importance, layer: int, keep: float) -> LayerPlan:
        shared, routed = shared_and_routed(domain_masks(importance, layer, keep))
        return LayerPlan(shared, routed)


class RandomPlanner(Planner):
    name = "random"

    def plan_layer(self, importance: Importance, layer: int, keep: float) -> LayerPlan:
        shared, routed = shared_and_routed(domain_masks(importance, layer, keep))
        num_experts, size = routed.shape
        free = _complement(shared, importance.intermediate_size)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + layer)
        order = free[torch.randperm(free.numel(), generator=generator)]
        rows = [order[(e * size + torch.arange(size)) % order.numel()].sort().values
                for e in range(num_experts)]
        return LayerPlan(shared, torch.stack(rows) if rows else routed)


class ClusterPlanner(Planner):
    name = "cluster"

    def plan_layer(self, importance: Importance, layer: int, keep: float) -> LayerPlan:
        shared, routed = shared_and_routed(domain_masks(importance, layer, keep))
        num_experts, size = routed.shape
        free = _complement(shared, importance.intermediate_size)
        profile = torch.stack([importance.scores[d][layer] for d in importance.domains], dim=1)
        points = profile[free].double()  # [F, D], magnitude kept
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + layer)
        centroids = balanced_kmeans(points, num_experts, generator)
        along = points @ torch.nn.functional.normalize(centroids, dim=1).T  # [F, E]
        rows = [free[top_channels(along[:, e], size)] for e in range(num_experts)]
        return LayerPlan(shared, torch.stack(rows))


class PrunePlanner(Planner):
    name = "prune"

    def names(self, stats: ActivationStats) -> list[str]:
        return ["all"]

    def plan_layer(self, importance: Importance, layer: int, keep: float) -> LayerPlan:
        shared, routed = shared_and_routed(domain_masks(importance, layer, keep))
        width = shared.numel() + routed.shape[1]
        per_domain = [importance.scores[d][layer] for d in importance.domains]
        scores = torch.stack([s / s.mean() for s in per_domain]).mean(dim=0)
        return LayerPlan(top_channels(scores, width), torch.zeros(1, 0, dtype=torch.long))


def balanced_kmeans(points: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Centroids `[k, D]` of k-means whose assignment step gives every cluster an equal share
    (greedy by distance under a capacity of ceil(n / k)), as in MoEfication.

    Points are assigned by direction (unit profile against unit centroid), so weak channels
    do not all pile into one cluster near the origin; a centroid is the mean of its raw
    points, so strong channels pull it, which is what makes the clustering magnitude-aware."""
    count = points.shape[0]
    capacity = -(-count // k)
    directions = torch.nn.functional.normalize(points, dim=1)
    centroids = points[torch.randperm(count, generator=generator)[:k]].clone()
    for _ in range(KMEANS_ITERATIONS):
        distance = torch.cdist(directions, torch.nn.functional.normalize(centroids, dim=1))
        order = torch.argsort(distance.flatten(), stable=True)
        assign = torch.full((count,), -1, dtype=torch.long)
        load = [0] * k
        for flat in order.tolist():
            point, cluster = divmod(flat, k)
            if assign[point] < 0 and load[cluster] < capacity:
                assign[point] = cluster
                load[cluster] += 1
        updated = torch.stack([points[assign == c].mean(dim=0) for c in range(k)])
        if torch.allclose(updated, centroids):
            break
        centroids = updated
    return centroids


def _complement(channels: torch.Tensor, size: int) -> torch.Tensor:
    mask = torch.ones(size, dtype=torch.bool)
    mask[channels] = False
    return mask.nonzero().flatten()


def check_request(stats: ActivationStats, keep: float) -> None:
    if not 0.0 < keep <= 1.0:
        raise ReadmoeError(f"--keep must be in (0, 1], got {keep}")
    if len(stats.domains) < 2:
        raise ReadmoeError(f"expert planning needs statistics of at least 2 domains, got "
                           f"{len(stats.domains)} ({', '.join(stats.domains) or 'none'})")
    if round(keep * stats.intermediate_size) < 1:
        raise ReadmoeError(f"--keep {keep} keeps no channel of {stats.intermediate_size}")


PLANNERS: dict[str, type[Planner]] = {
    cls.name: cls for cls in (ReadMEPlanner, ClusterPlanner, RandomPlanner, PrunePlanner)}


def make_planner(method: str, seed: int = 0) -> Planner:
    if method not in PLANNERS:
        raise ReadmoeError(f"unknown planning method {method!r}; choose one of "
                           f"{', '.join(PLANNERS)}")
    return PLANNERS[method](seed=seed)
