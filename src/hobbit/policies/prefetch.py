"""HOBBIT's layer-level adaptive prefetch walk (arXiv 2411.01433 §3.3) and prediction accounting.
Torch-free; the prediction itself (stacked next-layer gates) lives in the engine.

The paper's walk: at layer i, predict layer i+1's experts; if all are cached, predict i+2, and so
on; stop at the first layer whose predicted experts miss, or after p layers; prefetch the missing
ones and mask all predicted experts from eviction. The paper does not give the precision of a
prefetched expert; ours is Eq. 2 on the predicted routing weights, so a predicted
expert Eq. 2 would skip is neither loaded nor pinned nor counted as a miss.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from hobbit.policies.precision import SKIP, decide


@dataclass(frozen=True)
class PrefetchPlan:
    """``loads``: (layer, expert, tier) to enqueue as prefetches, in order of routing weight.
    ``pins``: (layer, expert, tier) of every predicted, non-skipped expert in the walked layers,
    the loads included; the caller pins the cached copy that serves each under its ``ServeRule``.
    ``stop_layer``: the layer whose misses are loaded, or None when every predicted layer hits."""

    loads: list[tuple[int, int, str]]
    pins: list[tuple[int, int, str]]
    stop_layer: int | None


def plan_prefetch(
    predicted: Mapping[int, Sequence[tuple[int, float]]],
    cached: Callable[[int, int, str], bool],
    t1: float,
    t2: float,
) -> PrefetchPlan:
    """Walk the predicted layers in ascending order (the caller passes layers i+1..i+p).

    ``predicted[layer]`` lists (expert, predicted routing weight); the tier of each is Eq. 2 on
    those weights (sorted descending here). ``cached(layer, expert, tier)`` says whether a cached
    copy serves that tier (the caller applies its ``ServeRule``). The walk stops at the first layer
    with a miss; its misses are the loads.
    """
    loads: list[tuple[int, int, str]] = []
    pins: list[tuple[int, int, str]] = []
    for layer in sorted(predicted):
        ranked = sorted(predicted[layer], key=lambda ew: -ew[1])
        if not ranked:
            continue
        tiers = decide([w for _, w in ranked], t1, t2)
        wanted = [(layer, e, tier) for (e, _), tier in zip(ranked, tiers) if tier != SKIP]
        pins.extend(wanted)
        loads = [k for k in wanted if not cached(*k)]
        if loads:
            return PrefetchPlan(loads, pins, layer)
    return PrefetchPlan([], pins, None)


@dataclass
class PredictionStats:
    """Accumulated accuracy of expert predictions against the experts actually routed.

    ``add`` takes one (layer, token) sample: predicted and actual expert ids, each ordered by
    routing weight descending. Precision = |P ∩ A| / |P|, recall = |P ∩ A| / |A| over all samples
    (micro-averaged); top-1 accuracy compares the first ids (the paper's metric: 96% one layer
    ahead on Mixtral). A ratio with nothing to count is 1.0 (no prediction was wrong);
    ``samples`` says how many samples were added.
    """

    true_pos: int = 0
    false_pos: int = 0
    false_neg: int = 0
    top1_hits: int = 0
    samples: int = 0

    def add(self, predicted: Sequence[int], actual: Sequence[int]) -> None:
        p, a = set(predicted), set(actual)
        self.true_pos += len(p & a)
        self.false_pos += len(p - a)
        self.false_neg += len(a - p)
        self.samples += 1
        self.top1_hits += bool(predicted) and bool(actual) and predicted[0] == actual[0]

    @property
    def precision(self) -> float:
        n = self.true_pos + self.false_pos
        return self.true_pos / n if n else 1.0

    @property
    def recall(self) -> float:
        n = self.true_pos + self.false_neg
        return self.true_pos / n if n else 1.0

    @property
    def top1_accuracy(self) -> float:
        return self.top1_hits / self.samples if self.samples else 1.0

    def as_dict(self) -> dict[str, float]:
        """The ratios plus the raw counts (so differences of two snapshots can be re-summarized)."""
        return {
            "precision": self.precision,
            "recall": self.recall,
            "top1_accuracy": self.top1_accuracy,
            "samples": self.samples,
            "true_pos": self.true_pos,
            "false_pos": self.false_pos,
            "false_neg": self.false_neg,
            "top1_hits": self.top1_hits,
        }

    @classmethod
    def from_counts(cls, d: dict) -> "PredictionStats":
        return cls(d["true_pos"], d["false_pos"], d["false_neg"], d["top1_hits"], d["samples"])
