"""HOBBIT's token-level precision rule (arXiv 2411.01433 §3.2, Eq. 2) and what a cached copy
of the other precision serves (our rule; the paper leaves it open). Torch-free.

Precisions here are tiers, ``'high'`` and ``'low'`` (plus ``'skip'`` from the rule); the engine
maps each tier to a quant format (e.g. high = bf16, low = int4).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

HIGH, LOW, SKIP = "high", "low", "skip"

TOLERANCE = 1e-9
"""Slack on the threshold comparisons (ours): normalizing by the sum can move a score that sits
exactly on a threshold, e.g. 0.6, by one rounding step; the tolerance keeps such ties on the
'<=' side as Eq. 2 states."""


def _normalized(weights: Sequence[float]) -> list[float]:
    w = [float(x) for x in weights]
    if not w:
        raise ValueError("need at least one routing weight")
    if any(x < 0 for x in w):
        raise ValueError(f"routing weights must be non-negative, got {w}")
    if any(a < b for a, b in zip(w, w[1:])):
        raise ValueError(f"routing weights must be sorted descending, got {w}")
    total = sum(w)
    if total <= 0:
        raise ValueError(f"routing weights must have a positive sum, got {w}")
    return [x / total for x in w]


def scores(weights: Sequence[float]) -> list[float]:
    """HOBBIT Eq. 2 unimportance scores.

    ``weights`` are the selected experts' routing weights sorted descending; they are normalized
    to sum to 1 first. ``score_0 = 0`` and ``score_i = sum_{j<i} w_j``: the routing mass of the
    experts ranked above expert i.
    """
    w = _normalized(weights)
    out, acc = [], 0.0
    for x in w:
        out.append(acc)
        acc += x
    return out


def decide(weights: Sequence[float], t1: float, t2: float) -> list[str]:
    """HOBBIT Eq. 2 decision per selected expert: ``score <= t1`` → 'high', ``<= t2`` → 'low',
    else 'skip'. The top-1 expert is always 'high'.

    The paper applies this to cache misses only (a hit serves whatever is cached, see
    ``ServeRule``) and uses ``t1 = 0.6, t2 = 0.9`` for Mixtral-8x7B. Requires ``0 <= t1 <= t2``.
    """
    if not 0.0 <= t1 <= t2:
        raise ValueError(f"need 0 <= t1 <= t2, got t1={t1}, t2={t2}")
    out = []
    for i, s in enumerate(scores(weights)):
        if i == 0 or s <= t1 + TOLERANCE:
            out.append(HIGH)
        elif s <= t2 + TOLERANCE:
            out.append(LOW)
        else:
            out.append(SKIP)
    return out


@dataclass(frozen=True)
class ServeRule:
    """Which cached copy serves a request for a precision (our rule; HOBBIT does not say).

    - A cached high copy always serves, whichever precision was asked for: a request for low with
      high cached is a hit on the high copy.
    - A request for low with only low cached is a hit on low.
    - A request for high with only low cached is a miss, unless ``allow_low_for_high`` (trade
      accuracy for latency), in which case the low copy serves it.
    """

    allow_low_for_high: bool = False

    def serve(self, want: str, have_high: bool, have_low: bool) -> str | None:
        """The tier of the cached copy that serves ``want`` ('high' | 'low'), or None for a miss."""
        if want not in (HIGH, LOW):
            raise ValueError(f"want must be 'high' or 'low', got {want!r}")
        if have_high:
            return HIGH
        if have_low and (want == LOW or self.allow_low_for_high):
            return LOW
        return None
