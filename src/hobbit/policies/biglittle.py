"""MoBiLE big-little experts (arXiv 2510.12357), as our hypothesis. Torch-free.

Only the abstract and secondary reviews of MoBiLE were available, so the rules below are our
reconstruction (notes: algorithms.md §2.3), not the paper's stated algorithm:

- The "big" model uses the router's own top-K; the "little" model uses the first ``ceil(K/2)``
  of them (the abstract: "reduces the number of experts for unimportant tokens to half"), with
  their weights rescaled to the top-K's total so the output scale matches the big model.
- Per token and layer, importance is the share of the top-K routing mass the little set
  captures: at or above ``threshold`` the little set suffices, below it the layer uses all K
  (a per-layer rule, no second forward pass, as in AdapMoE).
- Not implemented: a per-token fallback decided after a little-model forward pass from the LM
  head's confidence (speculative-decoding style), which costs a second forward pass.

All weight arguments are the selected experts' routing weights, sorted descending, as the family
defines them (renormalized or not).
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def _check(weights: Sequence[float]) -> list[float]:
    w = [float(x) for x in weights]
    if not w:
        raise ValueError("need at least one routing weight")
    if any(x < 0 for x in w) or sum(w) <= 0:
        raise ValueError(f"routing weights must be non-negative with a positive sum, got {w}")
    if any(a < b for a, b in zip(w, w[1:])):
        raise ValueError(f"routing weights must be sorted descending, got {w}")
    return w


def little_k(k: int) -> int:
    """Size of the little set for a top-``k`` router: ``ceil(k / 2)``."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return math.ceil(k / 2)


def little_mass(weights: Sequence[float]) -> float:
    """Share of the top-K routing mass held by the little set (the first ``ceil(K/2)``), in (0, 1]."""
    w = _check(weights)
    return sum(w[: little_k(len(w))]) / sum(w)


def little_weights(weights: Sequence[float]) -> list[float]:
    """The little set's weights, rescaled to sum to the top-K's total (1 for renormalizing families)."""
    w = _check(weights)
    head = w[: little_k(len(w))]
    scale = sum(w) / sum(head)
    return [x * scale for x in head]


def layer_weights(weights: Sequence[float], threshold: float) -> list[float]:
    """Per-layer big-little choice for one token.

    Returns the weights to compute with, for the leading experts in order: ``little_weights`` when
    ``little_mass >= threshold`` (the little set suffices), else the top-K weights unchanged (big).
    ``threshold`` in [0, 1]; 0 always picks little, anything above 1 always big.
    """
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    w = _check(weights)
    return little_weights(w) if little_mass(w) >= threshold else w

