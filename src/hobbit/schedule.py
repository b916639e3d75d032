"""Scheduler: every expert-caching decision, torch-free, shared by the live engine and `hobbit simulate`.

`run_layer` is the one orchestration of an MoE layer call: plan (per selected expert: serve a
cached copy 'hit', load one at a precision 'load', or drop it 'skip', HOBBIT Eq. 2) -> admit
(every load gets a cache slot *before* its read, evicting by the policy) -> fetch (the reads) ->
compute (in the order the copies land) -> predict -> prefetch (slots reserved the same way).
Reads go through a `Fetcher`: the live engine's reads blobs into slot memory on the loader
thread; the simulator's only counts them. Both run this same code on the same routing, so a
replay's counters are the live engine's by construction.

Slots: each cache pool holds one precision, so its byte budget is a number of equal slots; a
key's slot is fixed while it is cached and returns to the pool's free list when it is evicted.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

from .cache import CacheFull, ExpertCache
from .policies.eviction import Key, make_policy
from .policies.biglittle import layer_weights
from .policies.precision import HIGH, LOW, SKIP, ServeRule, decide
from .policies.prefetch import PredictionStats, plan_prefetch

DEMAND, PREFETCH = 0, 1  # fetch priorities: demand loads always go first
NO_CACHE_POLICIES = ("resident", "ondemand")
CACHE_POLICIES = ("lru", "lfu", "slru", "belady", "lru+prefetch", "hobbit")
POLICIES = NO_CACHE_POLICIES + CACHE_POLICIES


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
    little: float | None = None  # MoBiLE: run the top-ceil(k/2) experts when they hold this share of the routing mass
    prefetch_depth: int | None = None  # layers ahead to predict; None = policy default (hobbit 2, lru+prefetch 1)
    eviction_options: dict = field(default_factory=dict)

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
    skipped: int = 0  # token-expert selections dropped (Eq. 2 skips and MoBiLE's little set)
    little_tokens: int = 0  # token-layers that ran MoBiLE's little set
    selections: int = 0  # token-expert selections seen
    prefetch_issued: int = 0
    prefetch_used: int = 0  # prefetched copies that served a later request
    prefetch_cancelled: int = 0  # live only: queued prefetch reads dropped because their slot was reused first
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
                    prefetch_cancelled=self.prefetch_cancelled, prefetch_used=self.prefetch_used, loader_wait_s=self.loader_wait_s, evictions=self.evictions,
                    prediction=self.prediction.as_dict())


@dataclass
class Step:
    expert: int
    action: str  # 'hit' | 'load' | 'skip'
    key: Key | None = None
    slot: int | None = None  # the key's slot in its precision's pool; None = a load still waiting for room


class Fetcher(Protocol):
    """Moves blobs into slots. The live one reads the store on the loader thread; the simulator's counts."""

    def fetch(self, key: Key, slot: int, priority: int) -> None:
        """Start reading `key`'s blob into `slot` of its precision's pool (DEMAND or PREFETCH)."""

    def wait(self, key: Key, slot: int) -> None:
        """Return once `slot` holds `key` (raises the read's error)."""

    def drain(self) -> None:
        """Wait for every read in flight (a sequence boundary)."""


class Scheduler:
    def __init__(self, opt: Options, num_layers: int, top_k: int, expert_nbytes: Callable[[str], int],
                 budget_bytes: int | None):
        if opt.policy not in POLICIES:
            raise ValueError(f"unknown policy {opt.policy!r}; choose from {', '.join(POLICIES)}")
        if opt.policy == "hobbit" and not opt.low:
            raise ValueError("policy 'hobbit' needs a low precision (--low int4, int3 or int2) stored in the store")
        self.opt, self.num_layers, self.expert_nbytes = opt, num_layers, expert_nbytes
        self.serve_rule = ServeRule(allow_low_for_high=opt.allow_low_for_high)
        self.stats = Stats()
        self.weights: list[list[float]] | None = None  # per-token weights of the last plan(), when changed
        self.t = 0
        self.cache: ExpertCache | None = None
        self.capacity: dict[str, int] = {}  # precision -> slots in its pool
        self._free: dict[str, list[int]] = {}  # precision -> free slots (popped from the end)
        self._slot: dict[Key, int] = {}  # cached key -> its slot
        self._prefetched: set[Key] = set()  # admitted by a prefetch, not yet used
        self._pins: dict[int, list[Key]] = {}  # layer -> predicted keys pinned until that layer runs
        self._predicted: dict[int, list[int]] = {}  # layer -> predicted experts (for precision/recall)
        if opt.policy == "ondemand":  # no cache: top_k staging slots, emptied after each expert is computed
            self.cache = self._pools({"all": top_k * expert_nbytes(opt.high)}, lambda prec: "all", "lru")
        elif opt.policy in CACHE_POLICIES:
            self.cache = self._make_cache(top_k, budget_bytes)

    def _make_cache(self, top_k: int, budget: int | None) -> ExpertCache:
        o = self.opt
        if budget is None:
            raise ValueError(f"policy {o.policy!r} needs a budget (e.g. --budget 25%)")
        need = top_k * self.expert_nbytes(o.high)
        if budget < need:
            raise ValueError(f"budget {budget} bytes is too small: one layer's {top_k} active experts at "
                             f"{o.high} need {need} bytes ({need / 2**20:.1f} MiB); raise --budget to at least that")
        evictor = {"lru+prefetch": "lru"}.get(o.policy, o.policy)
        if o.policy != "hobbit":
            return self._pools({"all": budget}, lambda prec: "all", evictor)
        low_budget = int(budget * o.low_pool_fraction)
        pools = {HIGH: budget - low_budget, LOW: low_budget}
        if pools[HIGH] < need:
            raise ValueError(f"the high-precision pool ({pools[HIGH]} bytes) is below one layer's active experts "
                             f"({need} bytes); raise --budget or lower the low-pool fraction")
        high = o.high
        return self._pools(pools, lambda prec: HIGH if prec == high else LOW, evictor)

    def _pools(self, pools: dict[str, int], pool_of: Callable[[str], str], evictor: str) -> ExpertCache:
        """The cache, and the slot count of each pool's one precision (its budget over one expert's bytes)."""
        o = self.opt
        for prec in filter(None, (o.high, o.low if o.policy == "hobbit" else None)):
            n = pools[pool_of(prec)] // self.expert_nbytes(prec)
            if n < 1:
                raise ValueError(f"the {pool_of(prec)} pool ({pools[pool_of(prec)]} bytes) cannot hold one {prec} "
                                 f"expert ({self.expert_nbytes(prec)} bytes); raise --budget or the low-pool fraction")
            self.capacity[prec] = n
            self._free[prec] = list(range(n - 1, -1, -1))  # pop() hands out slot 0 first
        return ExpertCache(pools, pool_of, make_policy(evictor, self.num_layers, **o.eviction_options))

    # -- clock -----------------------------------------------------------------------------------
    def begin_sequence(self, fetcher: Fetcher | None = None) -> None:
        if fetcher is not None:
            fetcher.drain()  # no read may still be landing in a slot the new sequence reuses
        self.t = 0
        self._prefetched.clear()
        self._pins.clear()
        self._predicted.clear()
        if self.cache is not None:
            self.cache.unpin_all()
            self.cache.reset_sequence()

    def end_step(self) -> None:
        self.t += 1

    # -- one MoE layer call ----------------------------------------------------------------------
    def run_layer(self, layer: int, rows: Sequence[tuple[Sequence[int], Sequence[float]]], fetcher: Fetcher,
                  compute: Callable[[Step], None] | None = None,
                  predicted: dict[int, list[tuple[int, float]]] | None = None) -> list[list[float]] | None:
        """Plan, admit, fetch, prefetch for `predicted` (later layer -> [(expert, weight)]; the first
        `depth` layers are used; issued before this layer computes, so the reads overlap its compute),
        then compute each step as its copy lands. Returns the per-token weights to compute with when
        the plan dropped or rescaled a selection, else None."""
        steps = self.plan(layer, rows)
        weights = self.weights
        ready = [s for s in steps if s.slot is not None]
        waiting = [s for s in steps if s.action == "load" and s.slot is None]
        for s in ready:
            if s.action == "load":
                fetcher.fetch(s.key, s.slot, DEMAND)
        if predicted and self.opt.depth:
            for key, slot in self.prefetch(layer, dict(sorted(predicted.items())[:self.opt.depth])):
                fetcher.fetch(key, slot, PREFETCH)
        try:
            i = 0
            while i < len(ready) or waiting:
                if i == len(ready):  # nothing of this layer holds a pin: free the prefetch pins too
                    for keys in self._pins.values():
                        for key in keys:
                            self.cache.unpin(key)
                    self._pins.clear()
                    if not self._place(waiting, ready, fetcher):
                        raise RuntimeError(f"no cache slot frees up for layer {layer}'s loads (budget too small)")
                    continue
                s = ready[i]
                try:
                    fetcher.wait(s.key, s.slot)
                except BaseException:
                    self._drop(s.key)  # its slot holds no valid copy (the finally below unpins it)
                    raise
                if compute is not None:
                    compute(s)
                i += 1
                self._release(s.key)
                if waiting:
                    self._place(waiting, ready, fetcher)
        finally:
            for s in ready[i:]:
                self._release(s.key)
            self._unpin_predicted(layer)
        return weights

    def _place(self, waiting: list[Step], ready: list[Step], fetcher: Fetcher) -> bool:
        """Give waiting loads the slots that freed up, in order; True if any started."""
        started = False
        while waiting and (slot := self._admit(waiting[0].key)) is not None:
            s = waiting.pop(0)
            s.slot = slot
            self.cache.pin(s.key)
            fetcher.fetch(s.key, slot, DEMAND)
            ready.append(s)
            started = True
        return started

    def _release(self, key: Key) -> None:
        """This layer is done with `key`: unpin it (ondemand keeps nothing: the slot is free again)."""
        if self.cache is None:
            return
        self.cache.unpin(key)
        if self.opt.policy == "ondemand" and not self.cache.is_pinned(key):
            self._drop(key)

    # -- decisions -------------------------------------------------------------------------------
    def select(self, layer: int, rows: Sequence[tuple[Sequence[int], Sequence[float]]]
               ) -> tuple[dict[int, str], list[list[float]] | None]:
        """Per token: MoBiLE's little set (if `little` is set), then HOBBIT Eq. 2 tiers (policy hobbit).
        Eq. 2 decides misses only: an expert it would skip is still used when a copy is cached.

        Returns the tier per unique expert (the highest any token asks for) and, when a token
        drops or rescales an expert, the weights to compute with ([T][k], 0 for a dropped slot;
        the kept ones are not renormalized after an Eq. 2 skip, per the notes), else None.
        """
        o = self.opt
        rank = {HIGH: 0, LOW: 1, SKIP: 2}
        want: dict[int, str] = {}
        out, changed = [], False
        for ids, weights in rows:
            w = list(weights)
            if o.little is not None:
                kept = layer_weights(w, o.little)
                if len(kept) < len(w):
                    self.stats.little_tokens += 1
                    self.stats.skipped += len(w) - len(kept)
                    w, changed = kept + [0.0] * (len(w) - len(kept)), True
            n = sum(1 for x in w if x > 0) or 1
            tiers = decide(w[:n], o.t1, o.t2) if o.policy == "hobbit" else [HIGH] * n
            for slot, e in enumerate(ids):
                tier = tiers[slot] if slot < n else SKIP
                if tier == SKIP and slot < n and self._cached(layer, e, LOW) is not None:
                    tier = LOW  # cached: costs nothing to use
                if tier == SKIP and slot < n:
                    self.stats.skipped += 1
                    w[slot], changed = 0.0, True
                if e not in want or rank[tier] < rank[want[e]]:
                    want[e] = tier
            out.append(w)
        return want, (out if changed else None)

    def _fmt(self, tier: str) -> str:
        return self.opt.high if tier == HIGH else self.opt.low

    def _cached(self, layer: int, e: int, tier: str) -> str | None:
        """The tier of the cached copy that serves this request (ServeRule), or None."""
        c, o = self.cache, self.opt
        if c is None or o.policy == "ondemand":
            return None
        return self.serve_rule.serve(tier, (layer, e, o.high) in c, o.low is not None and (layer, e, o.low) in c)

    def plan(self, layer: int, rows: Sequence[tuple[Sequence[int], Sequence[float]]]) -> list[Step]:
        """rows: per token (expert ids sorted by weight desc, weights). Steps in ascending expert id;
        hits and admitted loads are pinned until `run_layer` is done with them."""
        if layer in self._predicted:
            self.stats.prediction.add(self._predicted.pop(layer), list(rows[-1][0]))
        steps = []
        want, self.weights = self.select(layer, rows)
        self.stats.selections += sum(len(ids) for ids, _ in rows)
        for e in sorted(want):
            tier = want[e]
            if tier == SKIP:
                steps.append(Step(e, "skip"))
            elif self.opt.policy == "resident":
                self.stats.hits[self.opt.high] += 1
                steps.append(Step(e, "hit", (layer, e, self.opt.high), e))
            elif (served := self._cached(layer, e, tier)) is not None:
                key = (layer, e, self._fmt(served))
                self.cache.touch(key, self.t, layer, served == HIGH)
                self.cache.pin(key)
                self.stats.hits[key[2]] += 1
                if key in self._prefetched:
                    self._prefetched.discard(key)
                    self.stats.prefetch_used += 1
                steps.append(Step(e, "hit", key, self._slot[key]))
            else:
                key = (layer, e, self._fmt(tier))
                self.stats.misses[key[2]] += 1
                self.stats.bytes_loaded["demand"] += self.expert_nbytes(key[2])
                slot = self._admit(key)
                if slot is not None:
                    self.cache.pin(key)
                steps.append(Step(e, "load", key, slot))
        return steps

    def _admit(self, key: Key) -> int | None:
        """Cache `key` in a slot (evicting by the policy); None when pinned keys leave no room."""
        if key in self._slot:
            return self._slot[key]
        try:
            evicted = self.cache.insert(key, None, self.expert_nbytes(key[2]), self.t, key[0], key[2] == self.opt.high)
        except CacheFull:
            return None
        if self.opt.policy != "ondemand":
            self.stats.evictions += len(evicted)
        self._prefetched.difference_update(evicted)
        for k in evicted:
            self._free[k[2]].append(self._slot.pop(k))
        slot = self._slot[key] = self._free[key[2]].pop()
        return slot

    def _drop(self, key: Key) -> None:
        """Forget a cached key without counting an eviction (ondemand, or a copy whose read failed)."""
        if key in self._slot:
            self.cache.discard(key)
            self._free[key[2]].append(self._slot.pop(key))
            self._prefetched.discard(key)

    def _unpin_predicted(self, layer: int) -> None:
        for key in self._pins.pop(layer, []):
            self.cache.unpin(key)

    # -- prefetch --------------------------------------------------------------------------------
    def prefetch(self, layer: int, predicted: dict[int, list[tuple[int, float]]]) -> list[tuple[Key, int]]:
        """After computing `layer`: HOBBIT's adaptive walk over predicted later layers. Pins the
        predicted experts until their layer runs and returns (key, slot) of the loads to start."""
        if self.cache is None or self.opt.depth == 0 or self.opt.policy == "ondemand":
            return []
        for j, pairs in predicted.items():
            self._predicted[j] = [e for e, _ in pairs]
        if self.opt.policy == "hobbit":
            t1, t2 = self.opt.t1, self.opt.t2
        else:
            t1 = t2 = 1.0  # full-precision speculation: every predicted expert is high
        plan = plan_prefetch(predicted, lambda j, e, tier: self._cached(j, e, tier) is not None, t1, t2)
        for j, e, tier in plan.pins:
            served = self._cached(j, e, tier)
            key = (j, e, self._fmt(served or tier))
            self.cache.pin(key)
            self._pins.setdefault(j, []).append(key)
        loads = []
        for j, e, tier in plan.loads:
            key = (j, e, self._fmt(tier))
            slot = self._admit(key)
            if slot is None:
                continue  # no room: the prediction stays a hint
            self.stats.prefetch_issued += 1
            self.stats.bytes_loaded["prefetch"] += self.expert_nbytes(key[2])
            self._prefetched.add(key)
            loads.append((key, slot))
        return loads
