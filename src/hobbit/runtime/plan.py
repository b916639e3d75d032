"""The contract between the Scheduler and what carries out its plan: a `Step` per selected expert, and
the `Fetcher` that moves blobs into slots (live: offload.SlotFetcher reads the store; `hobbit simulate`'s
CountingFetcher only counts). Torch-free."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from hobbit.policies.eviction import Key


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

    def landed(self, key: Key, slot: int) -> bool:
        """True when no read into `slot` is still under way (a `wait` would not block)."""

    def drain(self) -> None:
        """Wait for every read in flight (a sequence boundary)."""

    def cancel(self, key: Key, slot: int) -> bool:
        """Drop the read of `key` into `slot` if it has not started: True then (the slot holds no copy);
        False when it is running or done (it completes; the copy is valid)."""
