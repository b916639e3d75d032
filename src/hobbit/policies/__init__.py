"""Torch-free cache policies: eviction (LRU, LFU, SLRU, HOBBIT Eq. 3, Belady), the HOBBIT Eq. 2
precision rule, and the serve rule for cached copies of the other precision."""

from hobbit.policies.eviction import (
    DEFAULT_MULTIDIM_WEIGHTS,
    LFU,
    LRU,
    POLICY_NAMES,
    SLRU,
    Belady,
    EvictionPolicy,
    Key,
    Multidim,
    make_policy,
)
from hobbit.policies.precision import HIGH, LOW, SKIP, ServeRule, decide, scores

__all__ = [
    "DEFAULT_MULTIDIM_WEIGHTS", "LFU", "LRU", "POLICY_NAMES", "SLRU", "Belady", "EvictionPolicy",
    "Key", "Multidim", "make_policy",
    "HIGH", "LOW", "SKIP", "ServeRule", "decide", "scores",
]
