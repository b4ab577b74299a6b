"""Routed-expert residency: the cache, its eviction policies, and the known future they read."""

from readmoe.serve.experts.cache import CacheStats, ExpertCache
from readmoe.serve.experts.future import ExpertKey, FutureUses, step_needs
from readmoe.serve.experts.policies import POLICIES, EvictionPolicy, make_policy

__all__ = ["POLICIES", "CacheStats", "EvictionPolicy", "ExpertCache", "ExpertKey",
           "FutureUses", "make_policy", "step_needs"]
