"""OffloadedExperts: the ExpertProvider that serves experts from the store through slot pools.

Memory: per precision, one page-aligned buffer cut into equal slots, allocated once; a blob is
read (O_DIRECT) straight into its slot, and each slot's `Expert` is a set of tensor views made
once, so a load allocates nothing and copies nothing (formats whose runtime form differs from the
stored one, e.g. int3 expanded for the int4 kernel, keep a prepared buffer per slot as well).

Per MoE layer call the torch-free `Scheduler.run_layer` plans, admits loads into slots, fetches
through `SlotFetcher` and calls back `compute` for each expert as its copy lands; results are
summed in ascending expert id at the end, so they do not depend on what was cached. `resident`
skips the scheduler: every expert sits in one pool, computed directly. After the layer, the next
layers' experts are predicted with their stacked gates and prefetched (HOBBIT §3.3).
"""
from __future__ import annotations

import mmap
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from hobbit.store import quant
from hobbit.store.config import ModelConfig
from hobbit.runtime.experts import SILU, Act
from hobbit.runtime.loader import DEMAND, PREFETCH, Loader
from hobbit.policies.eviction import Key
from hobbit.runtime.options import Options
from hobbit.runtime.plan import Step
from hobbit.runtime.routing import softmax_topk
from hobbit.runtime.schedule import Scheduler
from hobbit.store.format import ALIGN, ExpertStore, blob_tensors
from hobbit.runtime.trace import TraceWriter


@dataclass
class Expert:
    """One expert ready to compute: prepared w13 [2I,H] and w2 [H,I] at one precision, and for
    families with expert biases b13 [2I], b2 [H] (fp32 views into the slot)."""
    w13: quant.Prepared
    w2: quant.Prepared
    b13: Tensor | None = None
    b2: Tensor | None = None
    act: Act = SILU

    def __post_init__(self) -> None:  # one native call per expert at decode: int4 SwiGLU without biases
        self.fused = (quant.fusable_swiglu(self.w13, self.w2) and self.b13 is None and self.b2 is None
                      and self.act.kind == "silu")

    def weighted(self, x: Tensor, weight: float) -> Tensor:  # x [1,H] -> weight * FFN(x) [1,H]
        if self.fused and x.dtype == torch.bfloat16 and x.is_contiguous():
            return quant.swiglu_weighted(x, self.w13, self.w2, weight)
        return self(x).mul_(weight)

    def __call__(self, x: Tensor) -> Tensor:  # x [n,H] -> [n,H]
        h = quant.linear(x, self.w13)  # [n,2I]
        if self.b13 is not None:
            h = h + self.b13.to(h.dtype)
        gate, up = h.chunk(2, dim=-1)  # [n,I] each
        y = quant.linear(self.act(gate, up), self.w2)
        return y if self.b2 is None else y + self.b2.to(y.dtype)


class SlotPool:
    """`n` slots of one precision in one page-aligned buffer (anonymous memory, allocated once)."""

    def __init__(self, store: ExpertStore, precision: str, n: int, dtype: torch.dtype):
        self.store, self.precision = store, precision
        blob_bytes, self.specs = store.layout(precision)
        self.stride = -(-blob_bytes // ALIGN) * ALIGN  # O_DIRECT: every slot starts and ends on a block
        self.buf = mmap.mmap(-1, max(1, n) * self.stride)
        self.raw = torch.frombuffer(self.buf, dtype=torch.uint8).view(max(1, n), self.stride)  # [n, stride]
        self.shapes, self.group_size, self.dtype = store.shapes(), store.group_size, dtype
        self.act = Act.of(ModelConfig.from_dict(store.manifest["config"]))
        self.experts = [self._prepare(i) for i in range(n)]
        base = self.raw.untyped_storage().data_ptr()
        owned = [t for e in self.experts[:1] for p in (e.w13, e.w2) for t in (p.w, p.scales) if t is not None]
        self.zero_copy = all(t.untyped_storage().data_ptr() == base for t in owned)  # runtime form = stored form
        extra = 0 if self.zero_copy else sum(t.numel() * t.element_size() for t in owned)
        self.slot_bytes = self.stride + extra  # RAM per slot: what the cache budget counts

    def _prepare(self, slot: int) -> Expert:
        parts = blob_tensors(self.raw[slot], self.specs)
        return Expert(*(quant.prepare(parts[p], self.precision, self.shapes[p], self.group_size, self.dtype)
                        for p in ("w13", "w2")), parts["b13"].get("b"), parts["b2"].get("b"), self.act)

    def load(self, slot: int, layer: int, expert: int) -> None:
        """Read one blob into `slot` (loader thread). Views see it at once; other forms are re-prepared."""
        self.store.read_into(layer, expert, self.precision, memoryview(self.buf)[slot * self.stride:(slot + 1) * self.stride])
        if not self.zero_copy:
            fresh, mine = self._prepare(slot), self.experts[slot]
            for a, b in ((mine.w13, fresh.w13), (mine.w2, fresh.w2)):
                a.w.copy_(b.w)
                if a.scales is not None:
                    a.scales.copy_(b.scales)


class SlotFetcher:
    """The live `Fetcher`: reads blobs into slots, prefetches on the loader thread, demand loads on the
    compute thread when it needs them (unless several loader threads read in parallel). At most one
    read per slot at a time, so a slot's bytes are never overwritten by a stale read after reuse."""

    def __init__(self, pools: dict[str, SlotPool], loader: Loader, stats, demand_on_loader: bool = False):
        """demand_on_loader: loader threads take demand reads too (several reads at once); by default the
        compute thread reads its own demand loads when it needs them, and the loader does the prefetches."""
        self.pools, self.loader, self.stats = pools, loader, stats
        self.demand_on_loader = demand_on_loader
        self._reads: dict[tuple[str, int], tuple[Key, object, int]] = {}  # (precision, slot) -> (key, future, priority)

    def fetch(self, key: Key, slot: int, priority: int) -> None:
        prec = key[2]
        prev = self._reads.get((prec, slot))
        if prev is not None and self.loader.cancel((prec, slot, prev[0])):
            self.stats.prefetch_cancelled += 1  # evicted before its read started: never read
        elif prev is not None and not prev[1].done():
            t0 = time.perf_counter()
            try:
                prev[1].result()  # a read into this slot is running: let it finish before reusing the slot
            except Exception:
                pass
            self.stats.loader_wait_s += time.perf_counter() - t0  # a wait for the loader like any other
        fut = self.loader.submit((prec, slot, key), lambda: self.pools[prec].load(slot, key[0], key[1]), priority,
                                 wake=priority == PREFETCH or self.demand_on_loader)
        self._reads[(prec, slot)] = (key, fut, priority)

    def cancel(self, key: Key, slot: int) -> bool:
        """Drop the queued read of `key` into `slot`: True if it never started (the slot holds nothing);
        False if it runs or ran (it completes, and a later `wait` checks it as usual)."""
        entry = self._reads.get((key[2], slot))
        if entry is None or entry[0] != key or not self.loader.cancel((key[2], slot, key)):
            return False
        del self._reads[(key[2], slot)]
        return True

    def wait(self, key: Key, slot: int) -> None:
        entry = self._reads.get((key[2], slot))
        if entry is None:
            return  # landed and checked earlier
        if entry[0] != key:
            raise RuntimeError(f"slot {slot} of the {key[2]} pool holds {entry[0]}, not {key}")
        fut = entry[1]
        if not fut.done():
            t0 = time.perf_counter()
            self._finish(key, slot, fut)
            self.stats.loader_wait_s += time.perf_counter() - t0
        if fut.exception() is not None:
            if entry[2] == PREFETCH:  # a failed prefetch is retried once as a demand load
                self.fetch(key, slot, DEMAND)
                return self.wait(key, slot)
            del self._reads[(key[2], slot)]
            raise fut.exception()
        del self._reads[(key[2], slot)]

    def landed(self, key: Key, slot: int) -> bool:
        entry = self._reads.get((key[2], slot))
        return entry is None or entry[1].done()

    def _finish(self, key: Key, slot: int, fut) -> None:
        """Until the read of `key` into `slot` is done: run it here if it has not started (demand
        reads are queued without waking a thread), else wait for the thread reading it."""
        if not self.loader.run_here((key[2], slot, key)):
            self.loader.promote((key[2], slot, key))
            try:
                fut.result()
            except Exception:
                pass  # the caller looks at fut.exception()

    def drain(self) -> None:
        for (prec, slot), (key, fut, _) in list(self._reads.items()):
            if not fut.done():
                self._finish(key, slot, fut)  # a failed read stays recorded: a later wait() retries or raises it


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
        ids, weights = softmax_topk(logits, self.top_k, self.norm_topk_prob)  # [depth, k]
        return {j: list(zip(ids[n].tolist(), weights[n].tolist())) for n, j in enumerate(ahead)}


class OffloadedExperts:
    def __init__(self, store: ExpertStore, num_layers: int, top_k: int, dtype: torch.dtype,
                 budget_bytes: int | None, options: Options, io_threads: int = 1, sparse_layers: int | None = None,
                 prefetch_threads: int = 1):
        for p in filter(None, (options.high, options.low)):
            if p not in store.precisions:
                raise ValueError(f"precision {p!r} is not in the store (it has {', '.join(store.precisions)}); "
                                 f"re-convert with `--precisions` including it")
        self.store, self.dtype, self.opt = store, dtype, options
        self._slot_bytes: dict[str, int] = {}
        self.scheduler = Scheduler(options, num_layers, top_k, self.expert_bytes, budget_bytes, sparse_layers)
        self.stats = self.scheduler.stats
        self.loader = Loader(threads=io_threads, prefetch_threads=prefetch_threads)
        self.predictor: Predictor | None = None
        self.trace: TraceWriter | None = None
        self.resident: dict[tuple[int, int], Expert] = {}
        if options.policy == "resident":  # every expert in RAM, at its mapped precision (default high)
            keys = sorted({(b.layer, b.expert) for b in store.blobs.values() if b.precision == options.high})
            prec_of = {k: (options.precision_map or {}).get(k, options.high) for k in keys}
            by_prec = {p: [k for k in keys if prec_of[k] == p] for p in sorted(set(prec_of.values()))}
            self.pools = {p: SlotPool(store, p, len(ks), dtype) for p, ks in by_prec.items()}
            for p, ks in by_prec.items():
                for slot, (layer, expert) in enumerate(ks):
                    self.pools[p].load(slot, layer, expert)
                    self.resident[(layer, expert)] = self.pools[p].experts[slot]
            self._resident_prec = prec_of
        else:
            self.pools = {p: SlotPool(store, p, n, dtype) for p, n in self.scheduler.capacity.items()}
        self.fetcher = SlotFetcher(self.pools, self.loader, self.stats, demand_on_loader=io_threads > 1)
        # MoBiLE: the little pass's unweighted outputs of the first sparse layer, by key, for its fallback
        # (that layer's input is the same in both passes, so a copy at the same key gives the same bits)
        self._little_out: dict[Key, Tensor] = {}
        self._redo = False  # this pass is a fallback (a big pass right after a little one)
        self._first_call = True  # the next experts() call is this pass's first sparse layer

    def expert_bytes(self, precision: str) -> int:
        """RAM one expert slot takes at this precision (what the budget counts), measured on a 1-slot pool."""
        if precision not in self._slot_bytes:
            self._slot_bytes[precision] = SlotPool(self.store, precision, 1, self.dtype).slot_bytes
        return self._slot_bytes[precision]

    def begin_sequence(self) -> None:
        self.scheduler.begin_sequence(self.fetcher)
        self._little_out.clear()
        self._redo, self._first_call = False, True
        if self.trace is not None:
            self.trace.begin_sequence()
            self.trace.cancelled(self.scheduler.cancelled)

    def end_step(self) -> None:
        self.scheduler.end_step()

    def begin_pass(self, little: bool, tokens: int = 1) -> None:
        self.scheduler.begin_pass(little, self.fetcher, tokens)
        self._redo = self.scheduler.fallback_pass
        if not self._redo:
            self._little_out.clear()
        self._first_call = True
        if self.trace is not None:
            self.trace.cancelled(self.scheduler.cancelled)

    # -- the hot path ----------------------------------------------------------------------------
    def experts(self, layer: int, x: Tensor, logits: Tensor, ids: Tensor, weights: Tensor) -> Tensor:
        rows = list(zip(ids.tolist(), weights.tolist()))
        predicted = self.predictor(layer, x) if self.predictor is not None else {}
        if self.trace is not None:
            self.trace.record(self.scheduler.t, layer, rows, logits, predicted, little=self.scheduler.little_pass)
        done: dict[int, tuple[Tensor | None, Tensor]] = {}  # expert -> (its tokens, or None at decode; weighted output)
        if self.resident:  # no scheduler: every copy is in RAM
            experts = sorted({e for r, _ in rows for e in r})
            for e in experts:
                self.stats.hits[self._resident_prec[(layer, e)]] += 1
            self.stats.selections += sum(len(r) for r, _ in rows)
            for e in experts:
                done[e] = _weighted(self.resident[(layer, e)], e, x, ids, rows[0], weights)
            return _combine(done, x)
        sched, plan_weights = self.scheduler, []
        # MoBiLE at a decode token's first sparse layer: the little pass keeps its experts' outputs, and
        # its fallback reuses those computed from a copy at the same precision instead of computing them
        # (a fallback that also redoes earlier accepted tokens has more rows: it computes them all)
        first, self._first_call = self._first_call, False
        keep = first and x.shape[0] == 1 and sched.little_pass
        reuse = self._little_out if first and self._redo and x.shape[0] == 1 else {}

        def compute(step: Step) -> None:
            w = weights
            if sched.weights is not None and x.shape[0] > 1:  # the plan dropped or rescaled selections
                if not plan_weights:  # (Eq. 2 skips, little sets); decode reads them from `row` instead
                    plan_weights.append(torch.tensor(sched.weights, dtype=weights.dtype))
                w = plan_weights[0]
            row = (rows[0][0], sched.weights[0]) if sched.weights is not None else rows[0]
            if step.key in reuse:
                self.stats.fallback_reused += 1
                done[step.expert] = None, reuse.pop(step.key).mul_(float(row[1][row[0].index(step.expert)]))
                return
            expert = self.pools[step.key[2]].experts[step.slot]
            if keep:  # [1,H] unweighted (x 1.0 is exact; through _weighted so `hobbit profile` times it)
                y = self._little_out[step.key] = _weighted(expert, step.expert, x, ids, (row[0], [1.0] * len(row[0])), w)[1]
                done[step.expert] = None, y.clone().mul_(float(row[1][row[0].index(step.expert)]))
                return
            done[step.expert] = _weighted(expert, step.expert, x, ids, row, w)

        sched.run_layer(layer, rows, self.fetcher, compute, predicted)
        if self.trace is not None:
            self.trace.stale(sched.stale)
        if reuse:
            reuse.clear()  # only the fallback's first sparse layer reuses
        return _combine(done, x)

    def close(self) -> None:
        self.loader.close()
        self.store.close()
        if self.trace is not None:
            self.trace.close()

    def cached_bytes(self) -> int:
        if self.resident:
            return sum(p.slot_bytes * len(p.experts) for p in self.pools.values())
        cache = self.scheduler.cache
        return sum(cache.used.values()) if cache is not None else 0


def _weighted(expert: Expert, e: int, x: Tensor, ids: Tensor, row: tuple, weights: Tensor
              ) -> tuple[Tensor | None, Tensor]:
    """(tokens routed to e or None at decode, their weighted outputs w * FFN_e(x) [n,H])."""
    if x.shape[0] == 1:  # decode: every selected expert sees the one token, no gather/scatter
        return None, expert.weighted(x, float(row[1][row[0].index(e)]))
    tok, rank = (ids == e).nonzero(as_tuple=True)  # tokens routed to e, and at which rank
    return tok, (expert(x[tok]) * weights[tok, rank, None]).to(x.dtype)


def _combine(done: dict[int, tuple[Tensor | None, Tensor]], x: Tensor) -> Tensor:
    """Sum the experts' weighted outputs in ascending expert id: the same order whatever was cached."""
    out = None if x.shape[0] == 1 else torch.zeros_like(x)  # [T,H]
    for e in sorted(done):
        tok, y = done[e]
        if tok is not None:
            out.index_add_(0, tok, y)
        else:
            out = y if out is None else out.add_(y)
    return torch.zeros_like(x) if out is None else out
