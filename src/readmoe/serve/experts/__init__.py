"""Routed-expert residency: the cache, its eviction policies, the known and predicted future
they read, the step planner, and the bounds no policy beats."""

from readmoe.serve.experts.cache import CacheStats, ExpertCache, LayerPlan, Load
from readmoe.serve.experts.future import ExpertKey, FutureUses, access_time, step_needs
from readmoe.serve.experts.plan import CoDesign, ExpertPlanner, StepPlan
from readmoe.serve.experts.policies import POLICIES, EvictionPolicy, make_policy
from readmoe.serve.experts.predict import NextExpertPredictor, make_predictor

__all__ = ["POLICIES", "CacheStats", "CoDesign", "EvictionPolicy", "ExpertCache", "ExpertKey",
           "ExpertPlanner", "FutureUses", "LayerPlan", "Load", "NextExpertPredictor",
           "StepPlan", "access_time", "make_policy", "make_predictor", "step_needs"]
