"""The run options of the expert schedule (policy names, budgets, thresholds) and its counters; torch-free.

`Options` is what every command's engine flags become; `Stats` what a run counts (live and
simulated alike); `parse_budget` reads the budget forms users type (bytes, sizes, shares).
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from hobbit.policies.biglittle import FALLBACK_PREFETCH, LITTLE_RULES
from hobbit.policies.precision import HIGH, LOW
from hobbit.policies.prefetch import PredictionStats

NO_CACHE_POLICIES = ("resident", "ondemand")
CACHE_POLICIES = ("lru", "lfu", "slru", "belady", "lru+prefetch", "hobbit")
# MoBiLE decoding over a cache policy: every decode token runs little first, unsure ones again big
MOBILE_POLICIES = {"mobile": "lru", "hobbit+mobile": "hobbit"}
POLICIES = NO_CACHE_POLICIES + CACHE_POLICIES + tuple(MOBILE_POLICIES)


def base_policy(policy: str) -> str:
    """The cache policy under a policy name: 'hobbit+mobile' -> 'hobbit', 'mobile' -> 'lru'."""
    return MOBILE_POLICIES.get(policy, policy)


_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
          "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}


def parse_budget(budget: int | float | str | None, total_bytes: int) -> int | None:
    """Bytes from 123, "512MiB", "2GiB", "1.5GB" or "25%" (of `total_bytes`: all expert bytes at the top precision)."""
    if budget is None or isinstance(budget, int):
        return budget
    if isinstance(budget, float):
        return int(budget)
    s = budget.strip().lower().replace(" ", "")
    if s.endswith("%"):
        try:
            pct = float(s[:-1])
        except ValueError:
            pct = -1
        if not 0 < pct <= 100:
            raise ValueError(f"budget {budget!r}: a percentage must be in (0, 100]")
        return int(total_bytes * pct / 100)
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)([a-z]*)", s)
    if not m or m.group(2) not in _UNITS:
        raise ValueError(f"budget {budget!r} is not understood; use bytes (123), a size (512MiB, 2GiB) or a share (25%)")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


@dataclass
class Options:
    policy: str = "lru"
    high: str = "bf16"  # precision of 'high' loads (of every load, for full-precision policies)
    low: str | None = None  # precision of 'low' loads (hobbit)
    t1: float = 0.6  # Eq. 2 thresholds (the paper's Mixtral values)
    t2: float = 0.9
    low_pool_fraction: float = 0.25  # hobbit: share of the budget that holds low-precision copies
    allow_low_for_high: bool = False  # a cached low copy may serve a request for high
    little: float | None = None  # threshold of the per-layer little rule (no second pass)
    little_rule: str | None = None  # 'mass' (top-ceil(k/2) hold this share of the mass) | 'adapmoe' (drop normalized weights under it)
    # a little set's kept weights (little pass, little rules): rescaled to the top-K's total, or the router's own
    # (resolve sets it from --little-weights and the family: router = rescaled iff the family renormalizes)
    little_renorm: bool = True
    mobile: bool = False  # MoBiLE decoding (set by the policy names in MOBILE_POLICIES; `policy` is then the base)
    gamma: float = 0.7  # MoBiLE: a little pass whose top next-token probability is below gamma is redone big
    # MoBiLE: a little pass reads what its fallback adds 'fit': where the pool holds the token's big set
    # (biglittle.fallback_reads_fit), 'always', or 'never' (the fallback loads on demand)
    fallback_prefetch: str = "fit"
    prefetch_depth: int | None = None  # layers ahead to predict; None = policy default (hobbit 2, lru+prefetch 1)
    # read a predicted rank ahead only while its measured precision is at least this (0: every predicted miss)
    prefetch_min_precision: float = 0.0
    # keep a queued prefetch of a layer whose router then chose other experts (default: drop it unread)
    keep_stale_prefetch: bool = False
    eviction_options: dict = field(default_factory=dict)
    # static per-expert precision, (layer, expert) -> format (unlisted: high); it replaces Eq. 2's per-token
    # rule on every policy; its one format besides `high` becomes `low` (the two tiers are two cache pools)
    precision_map: dict[tuple[int, int], str] | None = None

    def __post_init__(self) -> None:
        if self.policy in MOBILE_POLICIES:
            self.policy, self.mobile = MOBILE_POLICIES[self.policy], True
        if self.little is not None and self.little_rule is None:
            self.little_rule = "mass"  # `--little MASS` alone is the routing-mass rule
        if self.little_rule is not None:
            if self.little_rule not in LITTLE_RULES:
                raise ValueError(f"unknown little rule {self.little_rule!r}; choose from {', '.join(LITTLE_RULES)}")
            if self.little is None:
                raise ValueError(f"little rule {self.little_rule!r} needs a threshold (--little X)")
        if self.precision_map is not None:
            others = set(self.precision_map.values()) - {self.high}
            if len(others) > 1 or (others and self.low is not None and others != {self.low}):
                raise ValueError(f"a precision map holds two tiers: {self.high} (high) and one low format"
                                 f"{f' ({self.low})' if self.low else ''}; it names {', '.join(sorted(others))}")
            if others:
                self.low = others.pop()
        if self.fallback_prefetch not in FALLBACK_PREFETCH:
            raise ValueError(f"unknown fallback prefetch {self.fallback_prefetch!r}; choose from "
                             f"{', '.join(FALLBACK_PREFETCH)}")
        if not 0 <= self.prefetch_min_precision <= 1:
            raise ValueError(f"prefetch min precision must be in [0, 1] (0 reads every predicted miss), "
                             f"got {self.prefetch_min_precision}")
        if not 0 <= self.gamma <= 1.01:
            raise ValueError(f"gamma must be in [0, 1] (above 1: every token falls back), got {self.gamma}")

    @property
    def name(self) -> str:
        """The policy as the user names it ('hobbit+mobile', not the base 'hobbit')."""
        return next((k for k, v in MOBILE_POLICIES.items() if v == self.policy), self.policy) if self.mobile \
            else self.policy

    @property
    def two_tiers(self) -> bool:
        """High and low copies in two cache pools: a precision map that uses low, or policy hobbit whose Eq. 2
        can ask for low (t1 < 1; at t1 = 1 every score is <= t1, so the whole budget holds high copies)."""
        if self.precision_map is not None:
            return self.low is not None and self.low in self.precision_map.values()
        return self.policy == "hobbit" and self.t1 < 1

    def mapped_tier(self, layer: int, expert: int) -> str:
        """'high' | 'low': the precision map's tier of an expert (high when unlisted)."""
        return LOW if self.precision_map.get((layer, expert), self.high) != self.high else HIGH

    @property
    def depth(self) -> int:
        if self.prefetch_depth is not None:
            return self.prefetch_depth
        return {"hobbit": 2, "lru+prefetch": 1}.get(self.policy, 0)


@dataclass
class Stats:
    hits: Counter = field(default_factory=Counter)  # precision -> count (one per expert per layer call)
    misses: Counter = field(default_factory=Counter)
    bytes_loaded: Counter = field(default_factory=Counter)  # 'demand' / 'prefetch' -> bytes
    skipped: int = 0  # token-expert selections dropped (Eq. 2 skips, little sets and rules)
    little_tokens: int = 0  # token-layers that ran a little set (MoBiLE's little pass or a little rule)
    little_steps: int = 0  # MoBiLE: little forward passes
    fallbacks: int = 0  # MoBiLE: big passes that redid a little pass (the token was unsure)
    fallback_redone: int = 0  # MoBiLE: tokens accepted little whose positions a later fallback recomputed big
    fallback_prefetch_issued: int = 0  # MoBiLE: reads queued during little passes for what a fallback adds
    fallback_prefetch_used: int = 0  # ... that served the fallback pass of the same token
    fallback_prefetch_withheld: int = 0  # ... not issued (--fallback-prefetch: fit, the pool cannot keep them; never)
    fallback_prefetch_cancelled: int = 0  # ... dropped unread: the token was accepted before the loader started them
    fallback_bytes_saved: int = 0  # RAM bytes of those cancelled reads (never read, their slots freed)
    fallback_reused: int = 0  # live only: little-pass expert outputs of the first sparse layer a fallback reused
    selections: int = 0  # token-expert selections seen
    prefetch_issued: int = 0
    prefetch_used: int = 0  # prefetched copies that served a later request
    prefetch_cancelled: int = 0  # live only: queued prefetch reads dropped because their slot was reused first
    stale_prefetch_cancelled: int = 0  # queued prefetch reads dropped unread: their layer's router chose otherwise
    stale_bytes_saved: int = 0  # RAM bytes of those reads
    loader_wait_s: float = 0.0
    evictions: int = 0
    prediction: PredictionStats = field(default_factory=PredictionStats)

    def as_dict(self) -> dict:
        hits, misses = sum(self.hits.values()), sum(self.misses.values())
        precs = sorted(set(self.hits) | set(self.misses))
        return dict(hits=hits, misses=misses, hit_rate=hits / max(1, hits + misses),
                    hits_by_precision={p: self.hits[p] for p in precs},
                    misses_by_precision={p: self.misses[p] for p in precs},
                    bytes_demand=self.bytes_loaded["demand"], bytes_prefetch=self.bytes_loaded["prefetch"],
                    skipped=self.skipped, little_tokens=self.little_tokens, selections=self.selections, prefetch_issued=self.prefetch_issued,
                    little_steps=self.little_steps, fallbacks=self.fallbacks, fallback_redone=self.fallback_redone,
                    fallback_prefetch_issued=self.fallback_prefetch_issued,
                    fallback_prefetch_used=self.fallback_prefetch_used,
                    fallback_prefetch_withheld=self.fallback_prefetch_withheld,
                    fallback_prefetch_cancelled=self.fallback_prefetch_cancelled,
                    fallback_bytes_saved=self.fallback_bytes_saved, fallback_reused=self.fallback_reused,
                    prefetch_cancelled=self.prefetch_cancelled, stale_prefetch_cancelled=self.stale_prefetch_cancelled,
                    stale_bytes_saved=self.stale_bytes_saved, prefetch_used=self.prefetch_used, loader_wait_s=self.loader_wait_s, evictions=self.evictions,
                    prediction=self.prediction.as_dict())
