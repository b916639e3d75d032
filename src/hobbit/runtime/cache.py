"""ExpertCache: expert payloads in RAM under a byte budget per pool (torch-free).

Entries are keyed ``(layer, expert, precision)``. Each precision belongs to one pool
(``pool_of``); each pool has its own byte budget, as in HOBBIT's separate high- and
low-precision caches (arXiv 2411.01433 §3.4), or one pool for everything. The cache stores
payloads and bytes and keeps the books; whom to evict is the evictor's call, among the unpinned
entries of the pool that needs room.

Choices that are ours:

- Pins are counted: ``pin`` twice needs ``unpin`` twice (a prefetch pin and a demand pin on the
  same key do not cancel each other); ``unpin`` of a key with no pins does nothing. A key may be
  pinned before it is inserted (a prefetch still in flight).
- ``insert`` checks that the item can fit before evicting anything, so a failed insert leaves
  the cache untouched.
- Inserting a key that is already cached keeps the cached payload and counts as a use.
- Not thread-safe: one thread (the compute thread) owns it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from hobbit.policies.eviction import Evictor, Key


class CacheFull(Exception):
    """An item cannot fit in its pool: it is bigger than the budget, or the pinned entries leave
    too little room. ``min_bytes`` is the smallest budget for ``pool`` with which this insert
    would succeed (pinned bytes + the item's bytes)."""

    def __init__(self, key: Key, pool: str, nbytes: int, budget: int, pinned_bytes: int) -> None:
        self.key, self.pool, self.nbytes, self.budget = key, pool, nbytes, budget
        self.pinned_bytes = pinned_bytes
        self.min_bytes = pinned_bytes + nbytes
        super().__init__(
            f"cannot cache {key} ({nbytes} bytes) in pool {pool!r}: budget {budget} bytes, "
            f"{pinned_bytes} bytes pinned; the pool needs at least {self.min_bytes} bytes"
        )


@dataclass
class _Entry:
    payload: object
    nbytes: int
    pool: str


class ExpertCache:
    """Budgeted expert cache (ARCHITECTURE.md, "policies/ and cache.py").

    ``pools``: byte budget per pool name, e.g. ``{"high": 3 << 30, "low": 1 << 30}`` or
    ``{"all": 4 << 30}``. ``pool_of(precision)`` names a precision's pool. ``used`` and
    ``budgets`` are per pool; ``counters`` counts inserts, evictions, evicted bytes and rejected
    inserts (``CacheFull``).
    """

    def __init__(self, pools: dict[str, int], pool_of: Callable[[str], str], evictor: Evictor) -> None:
        if not pools:
            raise ValueError("need at least one pool")
        for name, budget in pools.items():
            if budget < 0:
                raise ValueError(f"pool {name!r} has a negative budget ({budget} bytes)")
        self.budgets: dict[str, int] = dict(pools)
        self.used: dict[str, int] = {name: 0 for name in pools}
        self.pool_of = pool_of
        self.evictor = evictor
        self.counters: dict[str, int] = {"inserts": 0, "evictions": 0, "evicted_bytes": 0, "rejected": 0}
        self._entries: dict[Key, _Entry] = {}
        self._pins: dict[Key, int] = {}
        self._by_pool: dict[str, dict[Key, None]] = {name: {} for name in pools}  # insertion-ordered key sets

    def __contains__(self, key: Key) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[Key]:
        """Cached keys, oldest insert first."""
        return list(self._entries)

    def get(self, key: Key) -> object | None:
        """The cached payload, or None; no bookkeeping (call ``touch`` for a use)."""
        entry = self._entries.get(key)
        return None if entry is None else entry.payload

    def touch(self, key: Key, t: int, layer_now: int, high: bool) -> None:
        """Record a use (a hit) of a cached key with the evictor."""
        if key not in self._entries:
            raise KeyError(f"touch of {key}, which is not cached")
        self.evictor.touch(key, t, layer_now, high)

    def _pool(self, key: Key) -> str:
        pool = self.pool_of(key[2])
        if pool not in self.budgets:
            raise KeyError(f"precision {key[2]!r} maps to pool {pool!r}, which is not one of {sorted(self.budgets)}")
        return pool

    def insert(self, key: Key, payload: object, nbytes: int, t: int, layer_now: int, high: bool) -> list[Key]:
        """Cache ``payload`` under ``key``, evicting unpinned entries of its pool (the evictor picks)
        until it fits; returns the evicted keys. Raises ``CacheFull`` (and changes nothing) when
        the item is bigger than the pool or the pinned entries leave too little room."""
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        if key in self._entries:
            self.touch(key, t, layer_now, high)
            return []
        pool = self._pool(key)
        budget = self.budgets[pool]
        # pins are few (one layer's experts plus predictions): sum over them, not over the cache
        pinned = sum(self._entries[k].nbytes for k in self._pins if k in self._entries and self._entries[k].pool == pool)
        if pinned + nbytes > budget:
            self.counters["rejected"] += 1
            raise CacheFull(key, pool, nbytes, budget, pinned)
        evicted: list[Key] = []
        while self.used[pool] + nbytes > budget:
            candidates = [k for k in self._by_pool[pool] if k not in self._pins]
            victim = self.evictor.victim(candidates, t, layer_now)
            if victim not in self._by_pool[pool] or victim in self._pins:  # (dict lookups: this runs per eviction)
                raise RuntimeError(f"evictor {self.evictor.name!r} chose {victim}, which is not an evictable candidate")
            self._evict(victim)
            evicted.append(victim)
        self._entries[key] = _Entry(payload, nbytes, pool)
        self._by_pool[pool][key] = None
        self.used[pool] += nbytes
        if self.used[pool] > budget:
            raise AssertionError(f"pool {pool!r} holds {self.used[pool]} bytes, over its budget of {budget}")
        self.counters["inserts"] += 1
        self.evictor.touch(key, t, layer_now, high)
        return evicted

    def _evict(self, key: Key) -> None:
        entry = self._entries.pop(key)
        del self._by_pool[entry.pool][key]
        self.used[entry.pool] -= entry.nbytes
        self.counters["evictions"] += 1
        self.counters["evicted_bytes"] += entry.nbytes
        self.evictor.remove(key)

    def discard(self, key: Key) -> None:
        """Remove ``key`` without counting an eviction (a copy that never became valid, a staging use)."""
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        del self._by_pool[entry.pool][key]
        self.used[entry.pool] -= entry.nbytes
        self.evictor.remove(key)

    def pin(self, key: Key) -> None:
        """Protect ``key`` from eviction (counted; it need not be cached yet)."""
        self._pins[key] = self._pins.get(key, 0) + 1

    def unpin(self, key: Key) -> None:
        """Undo one ``pin``; no-op for a key with no pins."""
        n = self._pins.get(key, 0)
        if n <= 1:
            self._pins.pop(key, None)
        else:
            self._pins[key] = n - 1

    def unpin_all(self) -> None:
        self._pins.clear()

    def is_pinned(self, key: Key) -> bool:
        return self._pins.get(key, 0) > 0

    def reset_sequence(self) -> None:
        """A new sequence starts: the evictor clears its per-sequence records."""
        self.evictor.reset()
