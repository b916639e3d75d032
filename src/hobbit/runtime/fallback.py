"""MoBiLE's passes in the Scheduler: the little/big pass clock, and the fallback reads a little pass
queues for the big pass that may redo its token (issued only where they can be used, cancelled when
the token is accepted). Torch-free; `Scheduler` mixes this in and owns the state it works on."""
from __future__ import annotations

from collections import Counter
from typing import Sequence

from hobbit.policies.biglittle import fallback_reads_fit, little_k
from hobbit.policies.eviction import Key
from hobbit.policies.precision import SKIP
from hobbit.runtime.plan import Fetcher

FALLBACK_PINS = -1  # the `_pins` entry of MoBiLE's fallback reads: held through the little pass


class MobilePasses:
    """The MoBiLE half of `Scheduler` (its attributes: cache, capacity, stats, opt, _slot, _pins,
    _prefetched, _fallback, little_pass, fallback_pass, cancelled, sparse_layers; its methods _tiers, _cached,
    _fmt, _admit, _drop_unread)."""

    def begin_pass(self, little: bool, fetcher: Fetcher | None = None, tokens: int = 1) -> None:
        """MoBiLE: the next forward pass (of `tokens` positions) is a little pass, or big. A big pass
        right after a little one is its fallback (the same token redone, after the tokens accepted little
        since the last big pass: `tokens` - 1 of them); a little pass starts a new token. A little pass
        right after a little one means the previous token was accepted: its fallback reads still queued
        are cancelled (`_cancel_fallback`; `cancelled` lists them)."""
        self.cancelled = []
        self.fallback_pass = not little and self.little_pass
        self._unpin_fallback()  # the little pass is over: its fallback copies may go
        if little:
            if self.little_pass:
                self._cancel_fallback(fetcher)
            self.stats.little_steps += 1
            self._fallback.clear()  # the previous token is settled: its fallback copies are plain cache now
        elif self.fallback_pass:
            self.stats.fallbacks += 1
            self.stats.fallback_redone += tokens - 1
        self.little_pass = little

    def _unpin_fallback(self) -> None:
        for key in self._pins.pop(FALLBACK_PINS, []):
            self.cache.unpin(key)

    def _cancel_fallback(self, fetcher: Fetcher | None) -> None:
        """The last little pass was accepted: no fallback comes, so the reads it queued for one and that
        have not started are dropped, in the order they were issued (the loader's next ones first); their
        keys leave the cache and their slots are free again. A read that started finishes, and its copy
        stays cached as usual. Whether a read started is the fetcher's answer (live: the loader's queue;
        simulated: what the trace recorded), so the cache's books follow what was really read."""
        if fetcher is None:
            return
        for key in list(self._fallback):
            if self._drop_unread(key, fetcher):
                self.cancelled.append(key)
                self.stats.fallback_prefetch_cancelled += 1
                self.stats.fallback_bytes_saved += self.expert_nbytes(key[2])
        self._fallback.clear()

    def _fallback_pays(self, prec: str, big: int) -> bool:
        """Issue a layer's fallback reads at `prec`, whose big set holds `big` copies at it? (--fallback-prefetch)"""
        mode = self.opt.fallback_prefetch
        return mode == "always" or mode == "fit" and fallback_reads_fit(self.capacity[prec], self.sparse_layers, big)

    def prefetch_fallback(self, layer: int, rows: Sequence[tuple[Sequence[int], Sequence[float]]]
                          ) -> list[tuple[Key, int]]:
        """During a MoBiLE little pass: admit what a fallback (big) pass of this layer adds, the last
        floor(k/2) experts of each token, at the tier HOBBIT's Eq. 2 gives on the full top-k (policy
        hobbit; high otherwise; skips are not read), where `_fallback_pays`: else the fallback loads them
        on demand. Returns (key, slot) of the reads to start."""
        if self.cache is None or self.opt.policy == "ondemand":
            return []
        loads = []
        for ids, weights in rows:
            tiers = self._tiers(layer, ids, weights)
            big = Counter(self._fmt(t) for t in tiers if t != SKIP)  # precision -> copies of this layer's big set
            for e, tier in list(zip(ids, tiers))[little_k(len(ids)):]:
                if tier == SKIP or self._cached(layer, e, tier) is not None:
                    continue
                key = (layer, e, self._fmt(tier))
                if not self._fallback_pays(key[2], big[key[2]]):
                    self.stats.fallback_prefetch_withheld += 1
                    continue
                if key in self._slot or (slot := self._admit(key)) is None:
                    continue  # queued already, or no room: the fallback loads it on demand
                self.stats.prefetch_issued += 1
                self.stats.fallback_prefetch_issued += 1
                self.stats.bytes_loaded["prefetch"] += self.expert_nbytes(key[2])
                self._prefetched.add(key)
                self._fallback[key] = None
                self.cache.pin(key)  # else Eq. 3's layer distance evicts it first, before the fallback needs it
                self._pins.setdefault(FALLBACK_PINS, []).append(key)
                loads.append((key, slot))
        return loads
