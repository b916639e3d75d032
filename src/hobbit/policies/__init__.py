"""Torch-free cache policies: eviction (LRU, LFU, SLRU, HOBBIT Eq. 3, Belady), the HOBBIT Eq. 2
precision rule and serve rule, MoBiLE big-little and AdapMoE weight rules, and the HOBBIT prefetch walk."""

from hobbit.policies.biglittle import LITTLE_RULES, adapmoe_weights, layer_weights, little_k, little_mass, little_weights
from hobbit.policies.eviction import (
    DEFAULT_MULTIDIM_WEIGHTS,
    LFU,
    LRU,
    SLRU,
    Belady,
    EVICTORS,
    Evictor,
    Key,
    Multidim,
    make_evictor,
)
from hobbit.policies.precision import HIGH, LOW, SKIP, ServeRule, decide, scores
from hobbit.policies.prefetch import PredictionStats, PrefetchPlan, plan_prefetch, ranks_worth_reading

__all__ = [
    "LITTLE_RULES", "adapmoe_weights", "layer_weights", "little_k", "little_mass", "little_weights",
    "DEFAULT_MULTIDIM_WEIGHTS", "EVICTORS", "LFU", "LRU", "SLRU", "Belady", "Evictor",
    "Key", "Multidim", "make_evictor",
    "HIGH", "LOW", "SKIP", "ServeRule", "decide", "scores",
    "PredictionStats", "PrefetchPlan", "plan_prefetch", "ranks_worth_reading",
]
