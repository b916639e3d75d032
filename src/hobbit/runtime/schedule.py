"""Scheduler: every expert-caching decision, torch-free, shared by the live engine and `hobbit simulate`.

`run_layer` is the one orchestration of an MoE layer call: plan (per selected expert: serve a
cached copy 'hit', load one at a precision 'load', or drop it 'skip', HOBBIT Eq. 2) -> admit
(every load gets a cache slot *before* its read, evicting by the policy) -> fetch (the reads) ->
prefetch for the predicted later layers (slots reserved the same way, reads overlapping this
layer's compute) -> compute (copies that have landed first, then as the others land).
Reads go through a `Fetcher`: the live engine's reads blobs into slot memory on the loader
thread; the simulator's only counts them. Both run this same code on the same routing, so a
replay's counters are the live engine's by construction.

MoBiLE's little/big passes and the fallback reads are the `MobilePasses` half (runtime/fallback.py).

Slots: each cache pool holds one precision, so its byte budget is a number of equal slots; a
key's slot is fixed while it is cached and returns to the pool's free list when it is evicted.
"""
from __future__ import annotations

from typing import Callable, Sequence

from hobbit.runtime.cache import CacheFull, ExpertCache
from hobbit.runtime.loader import DEMAND, PREFETCH  # fetch priorities: demand loads always go first
from hobbit.runtime.plan import Fetcher, Step
from hobbit.policies.eviction import Key, make_evictor
from hobbit.policies.biglittle import LITTLE_RULES, little_k, little_weights
from hobbit.policies.precision import HIGH, LOW, SKIP, ServeRule, decide
from hobbit.runtime.options import CACHE_POLICIES, POLICIES, Options, Stats
from hobbit.policies.prefetch import plan_prefetch, ranks_worth_reading
from hobbit.runtime.fallback import MobilePasses


class Scheduler(MobilePasses):
    def __init__(self, opt: Options, num_layers: int, top_k: int, expert_nbytes: Callable[[str], int],
                 budget_bytes: int | None, sparse_layers: int | None = None):
        """num_layers: all layers (Eq. 3's layer distance); sparse_layers: those with experts (default all)."""
        if opt.policy not in POLICIES:
            raise ValueError(f"unknown policy {opt.policy!r}; choose from {', '.join(POLICIES)}")
        if opt.policy == "hobbit" and not opt.low:
            raise ValueError("policy 'hobbit' needs a low precision (--low int4, int3 or int2) stored in the store")
        self.opt, self.num_layers, self.expert_nbytes = opt, num_layers, expert_nbytes
        self.sparse_layers = sparse_layers or num_layers
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
        self.little_pass = False  # MoBiLE: this forward pass runs each token's little set (begin_pass)
        self.fallback_pass = False  # MoBiLE: this forward pass is a fallback (big, right after a little one)
        self._fallback: dict[Key, None] = {}  # admitted for a fallback by the last little pass, not yet used (issue order)
        self.cancelled: list[Key] = []  # the fallback reads the last accepted little pass cancelled (traces record them)
        self.stale: list[Key] = []  # the prefetch reads the last layer call dropped unread (traces record them)
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
        evictor = {"lru+prefetch": "lru", "hobbit": "multidim"}.get(o.policy, o.policy)
        if not o.two_tiers:
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
        for prec in filter(None, (o.high, o.low if o.two_tiers else None)):
            n = pools[pool_of(prec)] // self.expert_nbytes(prec)
            if n < 1:
                raise ValueError(f"the {pool_of(prec)} pool ({pools[pool_of(prec)]} bytes) cannot hold one {prec} "
                                 f"expert ({self.expert_nbytes(prec)} bytes); raise --budget or the low-pool fraction")
            self.capacity[prec] = n
            self._free[prec] = list(range(n - 1, -1, -1))  # pop() hands out slot 0 first
        return ExpertCache(pools, pool_of, make_evictor(evictor, self.num_layers, **o.eviction_options))

    # -- clock -----------------------------------------------------------------------------------
    def begin_sequence(self, fetcher: Fetcher | None = None) -> None:
        self.cancelled = []
        if self.little_pass:  # the sequence ended on an accepted little pass: its fallback reads are not needed
            self._unpin_fallback()
            self._cancel_fallback(fetcher)
        if fetcher is not None:
            fetcher.drain()  # no read may still be landing in a slot the new sequence reuses
        self.t = 0
        self._prefetched.clear()
        self._pins.clear()
        self._predicted.clear()
        self.little_pass = False
        self._fallback.clear()
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
        steps = self.plan(layer, rows, fetcher)
        weights = self.weights
        ready = [s for s in steps if s.slot is not None]
        waiting = [s for s in steps if s.action == "load" and s.slot is None]
        for s in ready:
            if s.action == "load":
                fetcher.fetch(s.key, s.slot, DEMAND)
        if predicted and self.opt.depth:
            for key, slot in self.prefetch(layer, dict(sorted(predicted.items())[:self.opt.depth])):
                fetcher.fetch(key, slot, PREFETCH)
        if self.little_pass:  # read what a fallback would add while the little set computes
            for key, slot in self.prefetch_fallback(layer, rows):
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
                if not waiting:  # compute a copy that has landed before one still being read: with no load
                    # waiting for room no cache decision follows the order, and the sums run in expert-id order
                    j = next((j for j in range(i, len(ready)) if fetcher.landed(ready[j].key, ready[j].slot)), i)
                    ready.insert(i, ready.pop(j))
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
        """Per token: the little set (a MoBiLE little pass, or the `little_rule` when set), then HOBBIT
        Eq. 2 tiers (policy hobbit).
        Eq. 2 decides misses only: an expert it would skip is still used when a copy is cached.

        Returns the tier per unique expert (the highest any token asks for) and, when a token
        drops or rescales an expert, the weights to compute with ([T][k], 0 for a dropped slot;
        the kept ones are not renormalized after an Eq. 2 skip: a skip drops that expert's term), else None.
        """
        o = self.opt
        rank = {HIGH: 0, LOW: 1, SKIP: 2}
        want: dict[int, str] = {}
        out, changed = [], False
        for ids, weights in rows:
            w = list(weights)
            kept = little_weights(w, o.little_renorm) if self.little_pass else \
                LITTLE_RULES[o.little_rule](w, o.little, o.little_renorm) if o.little_rule is not None else w
            if len(kept) < len(w):
                self.stats.little_tokens += 1
                self.stats.skipped += len(w) - len(kept)
                w, changed = kept + [0.0] * (len(w) - len(kept)), True
            n = sum(1 for x in w if x > 0) or 1
            # Eq. 2 on the full top-k: dropping the tail does not change the mass ranked above an expert
            tiers = self._tiers(layer, ids, weights)[:n]
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

    def _tiers(self, layer: int, ids: Sequence[int], weights: Sequence[float]) -> list[str]:
        """Each selected expert's tier: the static precision map's, else Eq. 2 (policy hobbit), else high."""
        o = self.opt
        if o.precision_map is not None:
            return [o.mapped_tier(layer, e) for e in ids]
        return decide(weights, o.t1, o.t2) if o.policy == "hobbit" else [HIGH] * len(ids)

    def _fmt(self, tier: str) -> str:
        return self.opt.high if tier == HIGH else self.opt.low

    def _cached(self, layer: int, e: int, tier: str) -> str | None:
        """The tier of the cached copy that serves this request (ServeRule), or None."""
        c, o = self.cache, self.opt
        if c is None or o.policy == "ondemand":
            return None
        return self.serve_rule.serve(tier, (layer, e, o.high) in c, o.low is not None and (layer, e, o.low) in c)

    def plan(self, layer: int, rows: Sequence[tuple[Sequence[int], Sequence[float]]],
             fetcher: Fetcher | None = None) -> list[Step]:
        """rows: per token (expert ids sorted by weight desc, weights). Steps in ascending expert id;
        hits and admitted loads are pinned until `run_layer` is done with them. With a `fetcher`, this
        layer's prefetches the router did not choose are dropped first where unread (`_cancel_stale`)."""
        if layer in self._predicted:
            self.stats.prediction.add(self._predicted.pop(layer), list(rows[-1][0]))
        want, self.weights = self.select(layer, rows)
        self.stale = []
        if fetcher is not None and not self.opt.keep_stale_prefetch:
            self._cancel_stale(layer, want, fetcher)
        self.stats.selections += sum(len(ids) for ids, _ in rows)
        steps: dict[int, Step] = {}
        for e in sorted(want):  # hits first, pinned, so that this layer's own loads never evict them
            tier = want[e]
            if tier == SKIP:
                steps[e] = Step(e, "skip")
            elif self.opt.policy == "resident":
                self.stats.hits[self._fmt(tier)] += 1
                steps[e] = Step(e, "hit", (layer, e, self._fmt(tier)), e)
            elif (served := self._cached(layer, e, tier)) is not None:
                key = (layer, e, self._fmt(served))
                self.cache.touch(key, self.t, layer, served == HIGH)
                self.cache.pin(key)
                self.stats.hits[key[2]] += 1
                if key in self._prefetched:
                    self._prefetched.discard(key)
                    self.stats.prefetch_used += 1
                if key in self._fallback:
                    del self._fallback[key]
                    self.stats.fallback_prefetch_used += 1
                steps[e] = Step(e, "hit", key, self._slot[key])
        for e in sorted(want.keys() - steps.keys()):
            key = (layer, e, self._fmt(want[e]))
            self.stats.misses[key[2]] += 1
            self.stats.bytes_loaded["demand"] += self.expert_nbytes(key[2])
            slot = self._admit(key)
            if slot is not None:
                self.cache.pin(key)
            steps[e] = Step(e, "load", key, slot)
        return [steps[e] for e in sorted(steps)]

    def _cancel_stale(self, layer: int, want: dict[int, str], fetcher: Fetcher) -> None:
        """Prefetches of `layer` for experts its router did not choose: a read not started yet is dropped
        (the key leaves the cache, its slot is free for this layer's loads); one running or done stays
        cached. Saves the bytes of mispredictions while the reads queue behind each other (I/O-bound
        budgets); what was dropped is `stale`, so a trace replays it."""
        stale = {k for k in self._prefetched if k[0] == layer and k[1] not in want and k not in self._fallback}
        if not stale:
            return
        pins = self._pins.get(layer, [])
        for key in pins:
            if key in stale:
                self.cache.unpin(key)
        self._pins[layer] = [k for k in pins if k not in stale]
        for key in sorted(stale):
            if self._drop_unread(key, fetcher):
                self.stale.append(key)
                self.stats.stale_prefetch_cancelled += 1
                self.stats.stale_bytes_saved += self.expert_nbytes(key[2])

    def _drop_unread(self, key: Key, fetcher: Fetcher) -> bool:
        """Cancel the read of an unpinned cached `key` if it has not started (the fetcher says: live, the
        loader's queue; simulated, what the trace recorded) and forget the key, its slot free again.
        False when the read started or ran: it finishes and the copy stays cached as usual."""
        slot = self._slot.get(key)
        if slot is None or self.cache.is_pinned(key) or not fetcher.cancel(key, slot):
            return False
        self._drop(key)
        return True

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
            self._fallback.pop(k, None)
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
            self._fallback.pop(key, None)

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
        if self.little_pass:  # it computes each token's first ceil(k/2): read ahead those, the rest is the fallback's
            predicted = {j: sorted(pairs, key=lambda ew: -ew[1])[:little_k(len(pairs))]
                         for j, pairs in predicted.items()}
        mapped = self.opt.precision_map is not None
        # Eq. 2 on the predictions (policy hobbit), else full-precision speculation: every expert high
        t1, t2 = (self.opt.t1, self.opt.t2) if self.opt.policy == "hobbit" and not mapped else (1.0, 1.0)
        tier_of = (lambda j, e, tier: self.opt.mapped_tier(j, e)) if mapped else (lambda j, e, tier: tier)
        ranks = ranks_worth_reading(self.stats.prediction, self.opt.prefetch_min_precision)
        plan = plan_prefetch(predicted, lambda j, e, tier: self._cached(j, e, tier_of(j, e, tier)) is not None, t1, t2,
                             ranks)
        for j, e, tier in plan.pins:
            served = self._cached(j, e, tier_of(j, e, tier))
            key = (j, e, self._fmt(served or tier_of(j, e, tier)))
            self.cache.pin(key)
            self._pins.setdefault(j, []).append(key)
        loads = []
        for j, e, tier in plan.loads:
            key = (j, e, self._fmt(tier_of(j, e, tier)))
            slot = self._admit(key)
            if slot is None:
                continue  # no room: the prediction stays a hint
            self.stats.prefetch_issued += 1
            self.stats.bytes_loaded["prefetch"] += self.expert_nbytes(key[2])
            self._prefetched.add(key)
            loads.append((key, slot))
        return loads
