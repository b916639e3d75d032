"""OffloadedExperts: the ExpertProvider that serves experts from the store through a cache.

Per MoE layer call: decide which experts and precisions are needed, look each one up in the
cache, queue every miss on the loader at once (demand priority), then compute the experts in
ascending id order as their loads land, so compute overlaps the reads still in flight. The
order is fixed, so results do not depend on what happened to be cached.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from . import quant
from .cache import CacheFull, ExpertCache
from .policies.eviction import make_policy
from .policies.precision import HIGH, LOW, SKIP, ServeRule, decide
from .prefetch import DEMAND, Loader
from .store import ExpertStore

NO_CACHE_POLICIES = ("resident", "ondemand")
CACHE_POLICIES = ("lru", "lfu", "slru", "belady", "lru+prefetch", "hobbit")
POLICIES = NO_CACHE_POLICIES + CACHE_POLICIES


@dataclass
class Expert:
    """One expert ready to compute: prepared w13 [2I,H] and w2 [H,I] at one precision."""
    w13: quant.Prepared
    w2: quant.Prepared
    precision: str

    @property
    def nbytes(self) -> int:
        return self.w13.nbytes + self.w2.nbytes

    def __call__(self, x: Tensor) -> Tensor:  # x [n,H] -> [n,H]
        gate, up = quant.linear(x, self.w13).chunk(2, dim=-1)  # [n,I] each
        return quant.linear(F.silu(gate) * up, self.w2)


@dataclass
class ProviderStats:
    hits: Counter = field(default_factory=Counter)  # precision -> count
    misses: Counter = field(default_factory=Counter)
    skipped: int = 0
    prefetch_used: int = 0
    prefetch_issued: int = 0
    loader_wait_s: float = 0.0
    evictions: int = 0

    def as_dict(self) -> dict:
        hits, misses = sum(self.hits.values()), sum(self.misses.values())
        precs = sorted(set(self.hits) | set(self.misses))
        return dict(hits=hits, misses=misses, hit_rate=hits / max(1, hits + misses),
                    hits_by_precision={p: self.hits[p] for p in precs},
                    misses_by_precision={p: self.misses[p] for p in precs},
                    skipped=self.skipped, prefetch_issued=self.prefetch_issued,
                    prefetch_used=self.prefetch_used, loader_wait_s=self.loader_wait_s,
                    evictions=self.evictions)


@dataclass
class ProviderOptions:
    policy: str = "lru"
    high: str = "bf16"  # precision of 'high' loads (and of every load for full-precision policies)
    low: str | None = None  # precision of 'low' loads (hobbit)
    t1: float = 0.6
    t2: float = 0.9
    low_pool_fraction: float = 0.25  # hobbit: share of the budget for the low-precision pool
    allow_low_for_high: bool = False
    prefetch_depth: int = 0  # layers ahead to predict (0 = no prefetch)
    eviction_options: dict = field(default_factory=dict)


class OffloadedExperts:
    def __init__(self, store: ExpertStore, num_layers: int, dtype: torch.dtype, budget_bytes: int | None,
                 options: ProviderOptions):
        if options.policy not in POLICIES:
            raise ValueError(f"unknown policy {options.policy!r}; choose from {', '.join(POLICIES)}")
        for p in filter(None, (options.high, options.low)):
            if p not in store.precisions:
                raise ValueError(f"precision {p!r} is not in the store (it has {', '.join(store.precisions)}); "
                                 f"re-convert with `--precisions` including it")
        self.store, self.dtype, self.opt = store, dtype, options
        self.stats = ProviderStats()
        self.serve_rule = ServeRule(allow_low_for_high=options.allow_low_for_high)
        self.t = 0  # token clock of the current sequence
        self.resident: dict[tuple[int, int], Expert] = {}
        self.cache: ExpertCache | None = None
        self._expert_bytes: dict[str, int] = {}
        self.loader = Loader(self._load)
        if options.policy == "resident":
            for layer, expert in sorted({(b.layer, b.expert) for b in store.blobs.values()}):
                self.resident[(layer, expert)] = self._load((layer, expert, options.high))
        elif options.policy in CACHE_POLICIES:
            self.cache = self._make_cache(num_layers, budget_bytes)

    # -- setup ---------------------------------------------------------------------------------
    def expert_bytes(self, precision: str) -> int:
        """RAM one prepared expert takes at this precision (what the budget counts), measured."""
        if precision not in self._expert_bytes:
            first = next(b for b in self.store.blobs.values() if b.precision == precision)
            self._expert_bytes[precision] = self._load((first.layer, first.expert, precision)).nbytes
        return self._expert_bytes[precision]

    def _make_cache(self, num_layers: int, budget: int | None) -> ExpertCache:
        o = self.opt
        if budget is None:
            raise ValueError(f"policy {o.policy!r} needs a budget (e.g. --budget 25%)")
        top_k = self.store.manifest["config"]["top_k"]
        need = top_k * self.expert_bytes(o.high)
        if budget < need:
            raise ValueError(f"budget {budget} bytes is too small: one layer's {top_k} active experts at "
                             f"{o.high} need {need} bytes ({need / 2**20:.1f} MiB); raise --budget to at least that")
        options = dict(o.eviction_options)
        if o.policy == "belady":
            if "trace" not in options:
                raise ValueError("policy 'belady' needs the future access trace (a routing trace, --trace)")
        kind = {"lru+prefetch": "lru"}.get(o.policy, o.policy)
        policy = make_policy(kind, num_layers, **options)
        if o.policy == "hobbit" and o.low:
            low_budget = int(budget * o.low_pool_fraction)
            pools = {HIGH: budget - low_budget, LOW: low_budget}
            if pools[HIGH] < need:
                raise ValueError(f"the high-precision pool ({pools[HIGH]} bytes) is below one layer's active "
                                 f"experts ({need} bytes); raise --budget or lower the low-pool fraction")
            high_fmt = o.high
            return ExpertCache(pools, lambda prec: HIGH if prec == high_fmt else LOW, policy)
        return ExpertCache({"all": budget}, lambda prec: "all", policy)

    def _load(self, key: tuple[int, int, str]) -> Expert:
        """Runs on the loader thread: read the blob and prepare it for the kernels."""
        layer, expert, prec = key
        parts = self.store.read(layer, expert, prec)
        shapes, gs = self.store.shapes(), self.store.group_size
        return Expert(quant.prepare(parts["w13"], prec, shapes["w13"], gs, self.dtype),
                      quant.prepare(parts["w2"], prec, shapes["w2"], gs, self.dtype), prec)

    # -- sequence clock --------------------------------------------------------------------------
    def begin_sequence(self) -> None:
        self.t = 0
        if self.cache is not None:
            self.cache.reset_sequence()
            self.cache.unpin_all()
        self.loader.cancel_prefetches()

    def end_step(self) -> None:
        self.t += 1

    # -- the hot path ----------------------------------------------------------------------------
    def _wanted(self, ids: Tensor, weights: Tensor) -> dict[int, str]:
        """Precision tier per unique expert: the highest any token asks for (hobbit: Eq. 2)."""
        if self.opt.policy != "hobbit" or not self.opt.low:
            return {e: HIGH for e in ids.unique().tolist()}
        want: dict[int, str] = {}
        rank = {HIGH: 0, LOW: 1, SKIP: 2}
        for row_ids, row_w in zip(ids.tolist(), weights.tolist()):
            for e, tier in zip(row_ids, decide(row_w, self.opt.t1, self.opt.t2)):
                if e not in want or rank[tier] < rank[want[e]]:
                    want[e] = tier
        return want

    def _lookup(self, layer: int, e: int, tier: str) -> Expert | None:
        """A cached copy that may serve this tier, per the serve rule; records the use."""
        o, cache = self.opt, self.cache
        high_key, low_key = (layer, e, o.high), ((layer, e, o.low) if o.low else None)
        served = self.serve_rule.serve(tier, cache.get(high_key) is not None,
                                       low_key is not None and cache.get(low_key) is not None)
        if served is None:
            return None
        key = high_key if served == HIGH else low_key
        cache.touch(key, self.t, layer, served == HIGH)
        return cache.get(key)

    def experts(self, layer: int, x: Tensor, logits: Tensor, ids: Tensor, weights: Tensor) -> Tensor:
        out = torch.zeros_like(x)  # [T,H]
        want = self._wanted(ids, weights)
        ready: dict[int, Expert] = {}
        futures = {}
        for e, tier in sorted(want.items()):
            if tier == SKIP:
                self.stats.skipped += int((ids == e).sum())
                continue
            prec = self.opt.high if tier == HIGH else self.opt.low
            if self.resident:
                ready[e] = self.resident[(layer, e)]
            elif self.cache is not None and (hit := self._lookup(layer, e, tier)) is not None:
                ready[e] = hit
            else:
                futures[e] = self.loader.request((layer, e, prec), DEMAND)
                continue
            self.stats.hits[ready[e].precision] += 1
        if self.cache is not None:
            for e in ready:
                self.cache.pin((layer, e, ready[e].precision))
        try:
            for e in sorted(set(ready) | set(futures)):
                if e in futures:
                    t0 = time.perf_counter()
                    expert = futures[e].result()
                    self.stats.loader_wait_s += time.perf_counter() - t0
                    self.stats.misses[expert.precision] += 1
                    self._admit(layer, e, expert)
                else:
                    expert = ready[e]
                tok, slot = (ids == e).nonzero(as_tuple=True)  # tokens routed to e, and which of their k slots
                y = expert(x[tok])  # [n,H]
                out.index_add_(0, tok, (y * weights[tok, slot, None]).to(x.dtype))
        finally:
            if self.cache is not None:
                for e, expert in ready.items():
                    self.cache.unpin((layer, e, expert.precision))
        return out

    def _admit(self, layer: int, e: int, expert: Expert) -> None:
        if self.cache is None:
            return  # ondemand: use once and drop
        key = (layer, e, expert.precision)
        try:
            evicted = self.cache.insert(key, expert, expert.nbytes, self.t, layer, expert.precision == self.opt.high)
        except CacheFull:
            return  # everything left is in use right now (large prefill): compute without caching
        self.stats.evictions += len(evicted)

    def close(self) -> None:
        self.loader.close()
        self.store.close()

    def cached_bytes(self) -> int:
        if self.resident:
            return sum(x.nbytes for x in self.resident.values())
        return sum(self.cache.used.values()) if self.cache is not None else 0
