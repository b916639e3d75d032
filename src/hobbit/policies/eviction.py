"""Evictors: whom the expert cache evicts (torch-free).

A cache entry is keyed ``(layer, expert, precision)``. The clock is ``t`` (token index within the
sequence, 0-based; a prefill forward call counts as one step) and ``layer_now`` (the layer being
computed). The cache calls ``touch`` on every use of a key (a hit or a fresh insert), ``remove``
when a key leaves, and ``victim`` with the evictable (unpinned) keys of one pool.

The words: an *evictor* picks a victim (``lru``, ``lfu``, ``slru``, ``multidim``, ``belady``); a *policy*
(``--policy``: resident, ondemand, lru, ..., hobbit, mobile) is the whole schedule and names the evictor
it uses (hobbit evicts by ``multidim``; ``hobbit.runtime.options``).

Evictors: ``LRU`` (mixtral-offloading), ``LFU`` (per-sequence counts), ``SLRU`` (segmented LRU),
``Multidim`` (HOBBIT Eq. 3, arXiv 2411.01433 §3.4) and ``Belady`` (offline optimum, a bound for
simulations).

Choices that are ours, shared by all evictors:

- Ties are broken by least recent touch of the key (a global counter that never resets), then by
  the key itself, so every victim is deterministic.
- A candidate the policy has never seen counts as older than anything it has seen.
- The per-sequence usage records of LFU and Multidim (last use, use count, high-precision use
  count) are kept per *expert* ``(layer, expert)``, not per cached copy: they describe what the
  sequence needed, which does not depend on the precision a copy happens to hold. They survive
  ``remove`` (an evicted expert keeps its history until the sequence ends) and are cleared by
  ``reset``.
"""

from __future__ import annotations

import bisect
import math
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Protocol

Key = tuple[int, int, str]
"""(layer, expert, precision); precision is a format name from ``hobbit.store.quant.FORMATS``."""


class Evictor(Protocol):
    """What ``ExpertCache`` needs from an evictor (see ARCHITECTURE.md, "policies/ and cache.py")."""

    name: str

    def reset(self) -> None:
        """A new sequence starts: clear per-sequence records."""

    def touch(self, key: Key, t: int, layer_now: int, high: bool) -> None:
        """``key`` was used (a hit or a fresh insert); ``high`` marks a high-precision use."""

    def remove(self, key: Key) -> None:
        """``key`` left the cache."""

    def victim(self, candidates: Sequence[Key], t: int, layer_now: int) -> Key:
        """Return the candidate to evict. ``candidates`` is non-empty."""


class _Recency:
    """Global touch order of keys: the LRU tie-break shared by every policy."""

    def __init__(self) -> None:
        self._clock = 0
        self._stamp: dict[Key, int] = {}

    def touch(self, key: Key) -> None:
        self._clock += 1
        self._stamp[key] = self._clock

    def remove(self, key: Key) -> None:
        self._stamp.pop(key, None)

    def stamp(self, key: Key) -> int:
        """Larger = more recent; -1 for keys never touched (or removed)."""
        return self._stamp.get(key, -1)


def _check_candidates(candidates: Sequence[Key]) -> None:
    if not candidates:
        raise ValueError("victim() needs at least one candidate")


class LRU:
    """Least recently used (the mixtral-offloading policy, arXiv 2312.17238 §4).

    Recency is not a per-sequence record, so ``reset`` keeps it: clearing it would make the first
    victims of the next sequence arbitrary ties.
    """

    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[Key, None] = OrderedDict()  # touched keys, least recent first

    def reset(self) -> None:
        pass

    def touch(self, key: Key, t: int, layer_now: int, high: bool) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def remove(self, key: Key) -> None:
        self._order.pop(key, None)

    def victim(self, candidates: Sequence[Key], t: int, layer_now: int) -> Key:
        """The least recent candidate (never-touched ones first, by key): a walk from the old end of the
        touch order, which meets an unpinned key within a few steps, instead of ranking every candidate."""
        _check_candidates(candidates)
        wanted = set(candidates)
        unseen = [k for k in candidates if k not in self._order]
        if unseen:
            return min(unseen)
        return next(k for k in self._order if k in wanted)


class _SequenceRecords:
    """Per-sequence usage of each expert ``(layer, expert)``: HOBBIT's R, F and H records.

    ``last`` is the 1-based token number of the last use (0 = not used in this sequence), so that
    it divides by the 1-based current token number ``T = t + 1`` into [0, 1].
    """

    def __init__(self) -> None:
        self.last: dict[tuple[int, int], int] = {}
        self.uses: dict[tuple[int, int], int] = {}
        self.high_uses: dict[tuple[int, int], int] = {}

    def clear(self) -> None:
        self.last.clear()
        self.uses.clear()
        self.high_uses.clear()

    def record(self, key: Key, t: int, high: bool) -> None:
        e = (key[0], key[1])
        self.last[e] = t + 1
        self.uses[e] = self.uses.get(e, 0) + 1
        if high:
            self.high_uses[e] = self.high_uses.get(e, 0) + 1


class _Recorded:
    """Keeps per-sequence records (last use, uses, high-precision uses) plus recency for ties."""

    def __init__(self) -> None:
        self._records = _SequenceRecords()
        self._recency = _Recency()

    def reset(self) -> None:
        self._records.clear()

    def touch(self, key: Key, t: int, layer_now: int, high: bool) -> None:
        self._records.record(key, t, high)
        self._recency.touch(key)

    def remove(self, key: Key) -> None:
        self._recency.remove(key)


class LFU(_Recorded):
    """Least frequently used within the current sequence; ties go to the least recently used.

    Counts are per expert and reset per sequence (HOBBIT §3.4: sequence-level LFU beats
    model-level LFU by 4.5% hit ratio).
    """

    name = "lfu"

    def victim(self, candidates: Sequence[Key], t: int, layer_now: int) -> Key:
        _check_candidates(candidates)
        uses = self._records.uses
        return min(candidates, key=lambda k: (uses.get((k[0], k[1]), 0), self._recency.stamp(k), k))


class SLRU:
    """Segmented LRU: a probation segment and a protected segment.

    A key enters probation on its first touch; a touch while resident promotes it to the most
    recent end of the protected segment. When a victim is needed (the cache is full), the
    protected segment is first cut to ``floor(protected_fraction * resident keys)`` by demoting
    its least recent keys to the most recent end of probation; the victim is then the least
    recent candidate in probation, or, when no candidate is in probation, the least recent
    candidate in protected.

    Our choices: the policy does not know the cache's capacity, so the protected share is
    enforced at eviction time, when the resident keys fill the cache; it counts all resident keys
    the policy sees (the cache's pools share one policy); default 0.8 as in common SLRU
    implementations. Segments describe the cache's content, not the sequence, so ``reset`` keeps
    them.
    """

    name = "slru"

    def __init__(self, protected_fraction: float = 0.8) -> None:
        if not 0.0 <= protected_fraction < 1.0:
            raise ValueError(f"protected_fraction must be in [0, 1), got {protected_fraction}")
        self.protected_fraction = protected_fraction
        self._probation: OrderedDict[Key, None] = OrderedDict()  # least recent first
        self._protected: OrderedDict[Key, None] = OrderedDict()

    def reset(self) -> None:
        pass

    def touch(self, key: Key, t: int, layer_now: int, high: bool) -> None:
        if key in self._protected:
            self._protected.move_to_end(key)
        elif key in self._probation:
            del self._probation[key]
            self._protected[key] = None
        else:
            self._probation[key] = None

    def remove(self, key: Key) -> None:
        self._probation.pop(key, None)
        self._protected.pop(key, None)

    def segment(self, key: Key) -> str | None:
        """'probation', 'protected' or None (not resident)."""
        if key in self._probation:
            return "probation"
        if key in self._protected:
            return "protected"
        return None

    def victim(self, candidates: Sequence[Key], t: int, layer_now: int) -> Key:
        _check_candidates(candidates)
        cap = math.floor(self.protected_fraction * (len(self._probation) + len(self._protected)))
        while len(self._protected) > cap:
            demoted, _ = self._protected.popitem(last=False)
            self._probation[demoted] = None
        wanted = set(candidates)
        unknown = [k for k in candidates if k not in self._probation and k not in self._protected]
        if unknown:
            return min(unknown)
        for segment in (self._probation, self._protected):
            for k in segment:
                if k in wanted:
                    return k
        raise AssertionError("unreachable: every candidate is in a segment")


DEFAULT_MULTIDIM_WEIGHTS: dict[str, float] = {"lru": 0.25, "lfu": 0.25, "lhu": 0.25, "fld": 0.25}
"""Our default for Eq. 3's weights: the paper gives no values (it calibrates them per setting),
so every term counts equally until calibrated."""


class Multidim(_Recorded):
    """HOBBIT's multidimensional cache priority (arXiv 2411.01433 §3.4, Eq. 3); evicts the lowest.

        p = w_lru*R/T + w_lfu*F/T + w_lhu*H/T + w_fld*(1 - ((l_t - l_i + l_n) % l_n) / l_n)

    R is the 1-based token number of the expert's last use in this sequence (0 if unused), F its
    use count and H its high-precision use count in this sequence (``touch(..., high=True)``; a
    low-precision use does not update H, as in the paper), T = t + 1 the current token number (our
    shift: the paper's T is the token number, and t is 0-based), l_t the expert's layer, l_i =
    ``layer_now``, l_n = ``num_layers``. The FLD term is the cyclic forward distance: experts of
    the current and next layers score about 1, those of the layer just computed 1/l_n.

    Weights must be non-negative with a positive sum; they are normalized to sum to 1 as in the
    paper (only their ratios matter). Records reset per sequence (paper: "all records are reset
    at the start of each new sequence"). Ties: least recent touch of the key, then the key.
    """

    name = "multidim"

    def __init__(self, num_layers: int, weights: dict[str, float] | None = None) -> None:
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        w = dict(DEFAULT_MULTIDIM_WEIGHTS if weights is None else weights)
        if set(w) != set(DEFAULT_MULTIDIM_WEIGHTS):
            raise ValueError(f"weights need exactly the keys {sorted(DEFAULT_MULTIDIM_WEIGHTS)}, got {sorted(w)}")
        if any(v < 0 for v in w.values()) or sum(w.values()) <= 0:
            raise ValueError(f"weights must be non-negative with a positive sum, got {w}")
        total = sum(w.values())
        self.weights = {k: v / total for k, v in w.items()}
        self.num_layers = num_layers
        self._score: dict[tuple[int, int], float] = {}  # expert -> w_lru*R + w_lfu*F + w_lhu*H (Eq. 3 times T)
        n, wd = num_layers, self.weights["fld"]
        # [layer_now][layer] -> the FLD term
        self._fld = [[wd * (1.0 - ((layer - now + n) % n) / n) for layer in range(n)] for now in range(n)]
        super().__init__()

    def reset(self) -> None:
        super().reset()
        self._score.clear()

    def touch(self, key: Key, t: int, layer_now: int, high: bool) -> None:
        """Records as every evictor keeps them, and the expert's record terms of Eq. 3 summed once
        here: they change only on a touch, while a victim scan reads them for every candidate."""
        super().touch(key, t, layer_now, high)
        e, r, w = (key[0], key[1]), self._records, self.weights
        self._score[e] = w["lru"] * r.last[e] + w["lfu"] * r.uses[e] + w["lhu"] * r.high_uses.get(e, 0)

    def priority(self, key: Key, t: int, layer_now: int) -> float:
        """Eq. 3 for ``key`` at token ``t`` while computing ``layer_now``."""
        n = self.num_layers
        return self._score.get((key[0], key[1]), 0.0) * (1.0 / (t + 1)) + self._fld[layer_now % n][key[0] % n]

    def victim(self, candidates: Sequence[Key], t: int, layer_now: int) -> Key:
        """The lowest (priority, stamp, key); `priority` inlined (same expression, same floats): this
        scan runs once per eviction over the whole pool, so its per-candidate cost is the hot path."""
        _check_candidates(candidates)
        inv_t, n = 1.0 / (t + 1), self.num_layers
        score, stamp, fld = self._score.get, self._recency.stamp, self._fld[layer_now % n]
        best, best_rank = None, None
        for k in candidates:
            p = score((k[0], k[1]), 0.0) * inv_t + fld[k[0] % n]
            if best_rank is None or p <= best_rank[0]:
                rank = (p, stamp(k), k)
                if best_rank is None or rank < best_rank:
                    best, best_rank = k, rank
        return best


class Belady:
    """Offline optimal eviction (Belady's MIN): evict the candidate whose next use is farthest.

    Built from a recorded routing trace: ``trace`` lists every expert use as ``(seq, t, layer,
    expert)`` (sequence index, token step, layer, expert), one entry per expert per layer call.
    Precision is ignored: it is the bound for a full-precision run.

    Time, not call order (ours): the clock is ``(seq, t, layer_now)``, with ``seq`` counted by
    ``reset()`` (the cache calls it at every new sequence, the first call makes seq 0). A
    candidate's next use is its first trace entry after now, or at now if it has not been
    touched yet in this layer call (it is about to be used). So the order in which one layer's
    hits and loads reach the cache does not matter. Ties go to the least recent touch.
    """

    name = "belady"
    NEVER = (math.inf,)

    def __init__(self, trace: Iterable[tuple[int, int, int, int]]) -> None:
        self._occurrences: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
        for seq, t, layer, expert in trace:
            self._occurrences.setdefault((int(layer), int(expert)), []).append((int(seq), int(t), int(layer)))
        for occ in self._occurrences.values():
            occ.sort()
        self.seq = -1
        self._now: tuple[int, int, int] | None = None
        self._used_now: set[tuple[int, int]] = set()
        self._recency = _Recency()

    def reset(self) -> None:
        self.seq += 1

    def touch(self, key: Key, t: int, layer_now: int, high: bool) -> None:
        now = (self.seq, t, layer_now)
        if now != self._now:
            self._now, self._used_now = now, set()
        self._used_now.add((key[0], key[1]))
        self._recency.touch(key)

    def remove(self, key: Key) -> None:
        self._recency.remove(key)

    def next_use(self, key: Key, t: int, layer_now: int) -> tuple:
        """(seq, t, layer) of the next use of ``key``'s expert, or NEVER."""
        now = (self.seq, t, layer_now)
        occ = self._occurrences.get((key[0], key[1]), [])
        i = bisect.bisect_left(occ, now)
        if i < len(occ) and occ[i] == now and self._now == now and (key[0], key[1]) in self._used_now:
            i += 1  # already served in this layer call
        return occ[i] if i < len(occ) else self.NEVER

    def victim(self, candidates: Sequence[Key], t: int, layer_now: int) -> Key:
        _check_candidates(candidates)
        return max(candidates, key=lambda k: (self.next_use(k, t, layer_now), -self._recency.stamp(k)))


EVICTORS = ("lru", "lfu", "slru", "multidim", "belady")


def make_evictor(name: str, num_layers: int, **options) -> Evictor:
    """Build an evictor by name.

    ``options``: ``slru`` takes ``protected_fraction``; ``multidim`` takes ``weights`` (keys lru,
    lfu, lhu, fld); ``belady`` requires ``trace`` (``(seq, t, layer, expert)`` uses, see ``Belady``). ``lru`` and
    ``lfu`` take none. An unknown option raises TypeError.
    """
    if name == "lru":
        return LRU(**options)
    if name == "lfu":
        return LFU(**options)
    if name == "slru":
        return SLRU(**options)
    if name == "multidim":
        return Multidim(num_layers, **options)
    if name == "belady":
        if "trace" not in options:
            raise ValueError("evictor 'belady' needs trace=[(seq, t, layer, expert), ...]: a recorded routing trace")
        return Belady(**options)
    raise ValueError(f"unknown evictor {name!r}; valid names: {', '.join(EVICTORS)}")
