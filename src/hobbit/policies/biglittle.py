"""MoBiLE big-little experts (arXiv 2510.12357) and AdapMoE's weight threshold, as per-token
weight rules. Torch-free.

Only the abstract and second-hand descriptions of MoBiLE were available, not the full text:

- The "big" model uses the router's own top-K; the "little" model uses the first ``ceil(K/2)``
  of them with the weights the router would give a top-``ceil(K/2)``: renormalized to 1 where the
  family renormalizes its top-K (``norm_topk_prob``: Mixtral, Qwen3-MoE, OLMoE, SmolMoE), left as
  they are where it does not (Qwen2-MoE, CoderMoE: a dropped expert's term is dropped, the others
  keep theirs). ``renorm=True`` rescales to the top-K's total on every family (the paper's
  "renormalized" read literally; on CoderMoE it costs 3.5x the perplexity of the router's weights
  when every token stays little: README).
- MoBiLE's importance is per token, from the little pass's output confidence (top next-token
  probability below gamma -> recompute the token big); that decode loop lives in the engine
  (`Sequence.step`), the scheduler only runs a pass little or big (`Scheduler.begin_pass`).
- Two per-layer rules need no second pass: ``layer_weights`` (our earlier reading of the
  abstract: little when the little set holds at least a share of the routing mass) and
  ``adapmoe_weights`` (AdapMoE's code: drop an expert whose normalized weight is under a
  threshold, renormalize the rest).

All weight arguments are the selected experts' routing weights, sorted descending, as the family
defines them (renormalized or not); ``renorm`` says whether the kept ones are rescaled to the
top-K's total (the family renormalizes, or the user asks for it) or kept as the router gave them.
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


def _kept(w: list[float], head: list[float], renorm: bool) -> list[float]:
    """The kept leading weights `head` of `w`: rescaled to `w`'s total when `renorm`, else as they are."""
    scale = sum(w) / sum(head) if renorm else 1.0
    return [x * scale for x in head]


def little_weights(weights: Sequence[float], renorm: bool = True) -> list[float]:
    """The little set's weights: rescaled to sum to the top-K's total (1 for renormalizing families)
    when `renorm`, else the router's own."""
    w = _check(weights)
    return _kept(w, w[: little_k(len(w))], renorm)


def layer_weights(weights: Sequence[float], threshold: float, renorm: bool = True) -> list[float]:
    """Per-layer big-little choice for one token.

    Returns the weights to compute with, for the leading experts in order: ``little_weights`` when
    ``little_mass >= threshold`` (the little set suffices), else the top-K weights unchanged (big).
    ``threshold`` in [0, 1]; 0 always picks little, anything above 1 always big.
    """
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    w = _check(weights)
    return little_weights(w, renorm) if little_mass(w) >= threshold else w


def adapmoe_weights(weights: Sequence[float], threshold: float, renorm: bool = True) -> list[float]:
    """AdapMoE's gating baseline for one token: keep the leading experts whose normalized weight is
    at least ``threshold`` (the top-1 always), rescaled to the top-K's total when `renorm`, as AdapMoE
    renormalizes its kept top-1 to 1 (Mixtral). ``threshold`` in [0, 1]; 0 keeps every expert."""
    if not 0 <= threshold <= 1:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    w = _check(weights)
    total = sum(w)
    return _kept(w, [x for i, x in enumerate(w) if i == 0 or x / total >= threshold], renorm)


LITTLE_WEIGHTS = ("router", "rescaled")
"""--little-weights: the kept experts' weights as the family's router gives them (renormalized iff it
renormalizes its top-K), or always rescaled to the top-K's total."""

FALLBACK_PREFETCH = ("fit", "always", "never")
"""--fallback-prefetch: when a little pass reads what its fallback adds (``fallback_reads_fit``, always, never)."""


def fallback_reads_fit(capacity: int, layers: int, big: int) -> bool:
    """Whether MoBiLE's fallback reads can survive until the big pass uses them: a read issued at a
    layer of the little pass is used when the big pass reaches that layer again, a whole token of
    loads later, so its copy survives only if the pool (``capacity`` copies of one precision) holds
    the token's big set at that precision at once, ``big`` copies per layer over ``layers`` sparse
    layers (the little half the little pass itself loads and pins, the other half these reads).
    Below that, LRU-like eviction drops them before use and the reads only cost bandwidth."""
    if capacity < 0 or layers < 1 or big < 0:
        raise ValueError(f"need capacity >= 0, layers >= 1, big >= 0; got {capacity}, {layers}, {big}")
    return big * layers <= capacity


LITTLE_RULES = {"mass": layer_weights, "adapmoe": adapmoe_weights}
"""--little-rule name -> (weights, threshold, renorm) -> the leading weights to compute with."""
