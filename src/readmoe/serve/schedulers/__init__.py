"""Batch schedulers, chosen by name: one interface (``Scheduler.schedule``), one registry."""

from __future__ import annotations

from readmoe.errors import ReadmoeError
from readmoe.serve.schedulers.base import BatchBuilder, Scheduler
from readmoe.serve.schedulers.cache_aware import CacheAware
from readmoe.serve.schedulers.expert_aware import ExpertAware
from readmoe.serve.schedulers.simple import FCFS, DecodeFirst, PrefillFirst

SCHEDULERS: dict[str, type[Scheduler]] = {
    cls.name: cls for cls in (FCFS, DecodeFirst, PrefillFirst, ExpertAware, CacheAware)
}


def make_scheduler(name: str, **options: float | None) -> Scheduler:
    """Build the scheduler registered as ``name`` (options: ``max_wait``, ``max_experts`` and
    ``decodes_first`` for expert-aware and cache-aware, ``load_ratio`` for cache-aware)."""
    if name not in SCHEDULERS:
        raise ReadmoeError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    try:
        return SCHEDULERS[name](**options)
    except TypeError as exc:
        raise ReadmoeError(f"scheduler {name!r} does not take options {sorted(options)}") from exc


__all__ = ["SCHEDULERS", "BatchBuilder", "CacheAware", "DecodeFirst", "ExpertAware", "FCFS",
           "PrefillFirst", "Scheduler", "make_scheduler"]
