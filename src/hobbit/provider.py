"""OffloadedExperts: the ExpertProvider that serves experts from the store through a cache.

Per MoE layer call: the torch-free Scheduler decides, per selected expert, hit / load / skip;
every miss is queued on the loader at once (demand priority), then the experts are computed in
ascending id order as their loads land, so compute overlaps the reads still in flight. The
order is fixed, so results do not depend on what happened to be cached. After the layer, the
next layers' experts are predicted with their stacked gates and prefetched (HOBBIT §3.3).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from . import quant
from .prefetch import DEMAND, PREFETCH, Loader
from .schedule import Options, Scheduler
from .store import ExpertStore
from .trace import TraceWriter


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


class Predictor:
    """Next-layer expert prediction with stacked gates (HOBBIT's Stacking Computer).

    At sparse layer i the router input x_i = rmsnorm(h) * g_i. Layer j's router sees (roughly) the
    same residual normalized with its own norm weight g_j, so its logits are predicted by
    x_i @ (W_j * g_j / g_i).T; the next `depth` layers' corrected gates are stacked into one matrix
    and evaluated with a single matmul.
    """

    def __init__(self, gates: dict[int, Tensor], norms: dict[int, Tensor], depth: int, top_k: int,
                 norm_topk_prob: bool):
        self.top_k, self.norm_topk_prob = top_k, norm_topk_prob
        layers = sorted(gates)
        self.stacks: dict[int, tuple[list[int], Tensor]] = {}
        for n, i in enumerate(layers):
            ahead = layers[n + 1:n + 1 + depth]
            if not ahead:
                continue
            ratio = lambda j: (norms[j].float() / norms[i].float().clamp_min(1e-6))  # noqa: E731 [H]
            w = torch.cat([gates[j].float() * ratio(j)[None, :] for j in ahead])  # [depth*E, H]
            self.stacks[i] = (ahead, w.to(gates[i].dtype))

    def __call__(self, layer: int, x: Tensor) -> dict[int, list[tuple[int, float]]]:
        """x [T,H] -> {later layer: [(expert, weight), ...]} for the last token."""
        if layer not in self.stacks:
            return {}
        ahead, w = self.stacks[layer]
        logits = (x[-1:] @ w.T).float().view(len(ahead), -1)  # [depth, E]
        probs = torch.softmax(logits, dim=-1)
        weights, ids = probs.topk(self.top_k, dim=-1)  # [depth, k]
        if self.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        return {j: list(zip(ids[n].tolist(), weights[n].tolist())) for n, j in enumerate(ahead)}


class OffloadedExperts:
    def __init__(self, store: ExpertStore, num_layers: int, top_k: int, dtype: torch.dtype,
                 budget_bytes: int | None, options: Options, io_threads: int = 1):
        for p in filter(None, (options.high, options.low)):
            if p not in store.precisions:
                raise ValueError(f"precision {p!r} is not in the store (it has {', '.join(store.precisions)}); "
                                 f"re-convert with `--precisions` including it")
        self.store, self.dtype, self.opt = store, dtype, options
        self._expert_bytes: dict[str, int] = {}
        self.loader = Loader(self._load, threads=io_threads)
        self.scheduler = Scheduler(options, num_layers, top_k, self.expert_bytes, budget_bytes)
        self.stats = self.scheduler.stats
        self.resident: dict[tuple[int, int], Expert] = {}
        self.predictor: Predictor | None = None
        self.trace: TraceWriter | None = None
        self._inflight: dict[tuple[int, int, str], object] = {}  # prefetch key -> Future
        if options.policy == "resident":
            for layer, expert in sorted({(b.layer, b.expert) for b in store.blobs.values()}):
                self.resident[(layer, expert)] = self._load((layer, expert, options.high))

    def expert_bytes(self, precision: str) -> int:
        """RAM one prepared expert takes at this precision (what the budget counts), measured."""
        if precision not in self._expert_bytes:
            first = next(b for b in self.store.blobs.values() if b.precision == precision)
            self._expert_bytes[precision] = self._load((first.layer, first.expert, precision)).nbytes
        return self._expert_bytes[precision]

    def _load(self, key: tuple[int, int, str]) -> Expert:
        """Runs on the loader thread: read the blob and prepare it for the kernels."""
        layer, expert, prec = key
        parts = self.store.read(layer, expert, prec)
        shapes, gs = self.store.shapes(), self.store.group_size
        return Expert(quant.prepare(parts["w13"], prec, shapes["w13"], gs, self.dtype),
                      quant.prepare(parts["w2"], prec, shapes["w2"], gs, self.dtype), prec)

    # -- sequence clock --------------------------------------------------------------------------
    def begin_sequence(self) -> None:
        self.scheduler.begin_sequence()
        self.loader.cancel_prefetches()
        self._inflight = {k: f for k, f in self._inflight.items() if not f.cancelled()}
        if self.trace is not None:
            self.trace.begin_sequence()

    def end_step(self) -> None:
        self.scheduler.end_step()

    # -- the hot path ----------------------------------------------------------------------------
    def _drain_prefetches(self, wait: bool = False) -> None:
        for key, fut in list(self._inflight.items()):
            if not (fut.done() or wait):
                continue
            del self._inflight[key]
            if fut.cancelled() or fut.exception() is not None:
                continue  # a failed prefetch is retried as a demand load if it is really needed
            expert = fut.result()
            self.scheduler.prefetched(key, expert, expert.nbytes)

    def experts(self, layer: int, x: Tensor, logits: Tensor, ids: Tensor, weights: Tensor) -> Tensor:
        self._drain_prefetches(wait=self.opt.sync_prefetch)
        rows = list(zip(ids.tolist(), weights.tolist()))
        steps = self.scheduler.plan(layer, rows, lambda l, e: self.resident[(l, e)])
        if self.scheduler.weights is not None:  # per-token drops (Eq. 2 skip, MoBiLE little set)
            weights = torch.tensor(self.scheduler.weights, dtype=weights.dtype)
        futures = {s.expert: self.loader.request(s.key, DEMAND) for s in steps if s.action == "load"}
        out = torch.zeros_like(x)  # [T,H]
        try:
            for s in steps:
                if s.action == "skip":
                    continue
                if s.action == "load":
                    t0 = time.perf_counter()
                    expert = futures[s.expert].result()
                    self.stats.loader_wait_s += time.perf_counter() - t0
                    self._inflight.pop(s.key, None)
                    self.scheduler.loaded(s.key, expert, expert.nbytes)
                else:
                    expert = s.payload
                if len(rows) == 1:  # decode: one token, no gather/scatter
                    slot = rows[0][0].index(s.expert)
                    out += (expert(x) * weights[:, slot, None]).to(x.dtype)
                    continue
                tok, slot = (ids == s.expert).nonzero(as_tuple=True)  # tokens routed to this expert, their slot
                y = expert(x[tok])  # [n,H]
                out.index_add_(0, tok, (y * weights[tok, slot, None]).to(x.dtype))
        finally:
            self.scheduler.finish_layer(layer, steps)
        predicted = self.predictor(layer, x) if self.predictor is not None else {}
        if self.trace is not None:
            self.trace.record(self.scheduler.t, layer, rows, logits, predicted)
        for key in self.scheduler.prefetch(layer, dict(sorted(predicted.items())[:self.opt.depth])):
            if key not in self._inflight:
                self._inflight[key] = self.loader.request(key, PREFETCH)
        return out

    def close(self) -> None:
        self.loader.close()
        self.store.close()
        if self.trace is not None:
            self.trace.close()

    def cached_bytes(self) -> int:
        if self.resident:
            return sum(x.nbytes for x in self.resident.values())
        cache = self.scheduler.cache
        return sum(cache.used.values()) if cache is not None else 0
