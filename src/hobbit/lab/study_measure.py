"""`hobbit study`'s instruments: the importance signals of experts (pure functions over routing traces),
HOBBIT's per-token rule as an ExpertProvider, and the measurements (calibration, perplexity points,
kernel times, decode traces, simulator counters). The command and its orchestration: study.py.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from hobbit.policies.precision import TOLERANCE
from hobbit.runtime.options import Options
from hobbit.runtime.trace import read_trace

SIGNALS = ("weight", "frequency", "hybrid", "confidence", "loss")
SIGNAL_DOC = {
    "weight": "mean routing weight of the expert when selected (calibration text)",
    "frequency": "share of calibration tokens that select the expert",
    "hybrid": "routing mass: sum of the expert's routing weights per calibration token (= frequency x weight)",
    "confidence": "MoBiLE's signal: mean 1 - p_top over the calibration tokens routed to the expert, p_top the "
                  "full-precision model's top next-token probability (experts of unsure tokens are important)",
    "loss": "mean next-token loss of the calibration tokens routed to the expert (loss-weighted variant)",
}

# -- importance signals (pure) -----------------------------------------------------------------------

def routing_stats(calls, p_top: dict[tuple[int, int], float] | None = None,
                  nll: dict[tuple[int, int], float] | None = None) -> dict:
    """Per expert 'L/E': n (selections), w (routing weight sum), u (sum of 1 - p_top), loss (sum of nll)
    over trace layer calls; p_top/nll are keyed (seq, token index). Also tokens per layer."""
    experts: dict[str, dict[str, float]] = {}
    tokens: dict[int, int] = {}
    for c in calls:
        tokens[c.layer] = tokens.get(c.layer, 0) + len(c.ids)
        for i, (ids, ws) in enumerate(zip(c.ids, c.w)):
            for e, w in zip(ids, ws):
                s = experts.setdefault(f"{c.layer}/{e}", dict(n=0, w=0.0, u=0.0, loss=0.0))
                s["n"] += 1
                s["w"] += w
                s["u"] += 1.0 - p_top[(c.seq, i)] if p_top else 0.0
                s["loss"] += nll.get((c.seq, i), 0.0) if nll else 0.0
    return dict(experts=experts, tokens={str(k): v for k, v in tokens.items()})


def signals(stats: dict, keys: list[str]) -> dict[str, dict[str, float]]:
    """signal -> {'L/E': importance}; higher is more important; an expert never selected scores 0."""
    out = {s: {} for s in SIGNALS}
    for k in keys:
        st = stats["experts"].get(k, dict(n=0, w=0.0, u=0.0, loss=0.0))
        n, tok = st["n"], max(1, stats["tokens"].get(k.split("/")[0], 0))
        out["weight"][k] = st["w"] / n if n else 0.0
        out["frequency"][k] = n / tok
        out["hybrid"][k] = st["w"] / tok
        out["confidence"][k] = st["u"] / n if n else 0.0
        out["loss"][k] = st["loss"] / n if n else 0.0
    return out


def bottom(scores: dict[str, float], fraction: float) -> list[str]:
    """The round(fraction x N) least important experts (ties: lower layer, then expert, first)."""
    order = sorted(scores, key=lambda k: (scores[k], *map(int, k.split("/"))))
    return order[:round(fraction * len(order))]


def ranks(xs: list[float]) -> list[float]:
    order = sorted(range(len(xs)), key=xs.__getitem__)
    r = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for m in range(i, j + 1):
            r[order[m]] = (i + j) / 2
        i = j + 1
    return r


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va, vb = sum((x - ma) ** 2 for x in ra), sum((y - mb) ** 2 for y in rb)
    return cov / math.sqrt(va * vb) if va and vb else 0.0


def eq2_scores(calls) -> tuple[list[float], int]:
    """HOBBIT Eq. 2 scores of every non-top-1 selection, and the number of selections."""
    out, total = [], 0
    for c in calls:
        for ws in c.w:
            s, acc = sum(ws), 0.0
            total += len(ws)
            for i, w in enumerate(ws):
                if i:
                    out.append(acc / s)
                acc += w
    return out, total


def t1_for_share(scores: list[float], total: int, share: float) -> float:
    """The Eq. 2 T1 that sends `share` of all selections to low (as near as the scores allow; the top-1
    expert is always high, so at most len(scores)/total)."""
    m = min(len(scores), round(share * total))
    if m == 0:
        return 1.0
    desc = sorted(scores, reverse=True)
    return desc[m] if m < len(desc) else 0.0  # desc[m] stays high (score <= T1), the m above it go low


def low_share(calls, t1: float) -> float:
    scores, total = eq2_scores(calls)
    return sum(s > t1 + TOLERANCE for s in scores) / max(1, total)


# -- the per-token rule as a provider (quality of HOBBIT's Eq. 2 with no cache in the way) ---------------

class PerTokenPrecision:
    """ExpertProvider: every selection whose Eq. 2 score exceeds t1 runs at the low copy, above t2 it is
    skipped, the rest run at high (the top-1 expert always). What live HOBBIT computes when no cached
    high copy serves a low request, so its quality loss bounds the live engine's from above."""

    def __init__(self, high: dict, low: dict, t1: float, t2: float = 1.0):
        self.high, self.low, self.t1, self.t2 = high, low, t1, t2

    def experts(self, layer, x, logits, ids, weights):
        norm = weights / weights.sum(-1, keepdim=True)
        score = norm.cumsum(-1) - norm  # [T,k] mass ranked above each slot
        is_low = score > self.t1 + TOLERANCE
        is_low[:, 0] = False
        run = score <= self.t2 + TOLERANCE  # the rest are skipped
        run[:, 0] = True
        out = torch.zeros_like(x)
        for e in ids.unique().tolist():
            for low, table in ((False, self.high), (True, self.low)):
                tok, rank = ((ids == e) & (is_low == low) & run).nonzero(as_tuple=True)
                if tok.numel():
                    out.index_add_(0, tok, (table[(layer, e)](x[tok]) * weights[tok, rank, None]).to(x.dtype))
        return out


class RuleQuality:
    """Perplexity cost (%) of Eq. 2's per-token rule at (t1, t2) against all-high, on teacher-forced windows
    of `ids` (`hobbit tune`'s quality limit): both tiers resident (they must fit in RAM together), no
    cache in the way, so it bounds what live HOBBIT loses from above. Results are kept per (t1, t2)."""

    def __init__(self, store: Path, ids: list[int], window: int, high: str, low: str, **engine_knobs):
        from hobbit.runtime.engine import load
        self.ids, self.window = ids, window
        self.engine = load(store, policy="resident", high=high, **engine_knobs)
        try:
            low_engine = load(store, policy="resident", high=low, **engine_knobs)
        except BaseException:
            self.engine.close()
            raise
        self.tables = (self.engine.provider.resident, low_engine.provider.resident)
        self.closers = [low_engine.close, self.engine.close]
        self.base_ppl = self._ppl(1.0, 1.0)
        self.measured: dict[tuple[float, float], float] = {}

    def _ppl(self, t1: float, t2: float) -> float:
        from hobbit.lab.evaluate import evaluate_ppl
        self.engine.model.provider = PerTokenPrecision(*self.tables, t1, t2)
        with torch.inference_mode():
            return evaluate_ppl(self.engine, self.ids, self.window)["ppl"]

    def __call__(self, t1: float, t2: float) -> float:
        if (t1, t2) not in self.measured:
            self.measured[(t1, t2)] = 100 * (self._ppl(t1, t2) / self.base_ppl - 1)
        return self.measured[(t1, t2)]

    def close(self) -> None:
        for close in self.closers:
            close()


# -- measurements (torch) ----------------------------------------------------------------------------

def run_texts(engine, texts: dict[str, list[int]], window: int, keep_trace: Path | None = None) -> dict:
    """Per text: ppl, nll, tokens, argmax predictions (teacher-forced disjoint windows)."""
    from hobbit.lab.evaluate import evaluate_ppl
    out = {}
    for name, ids in texts.items():
        r = evaluate_ppl(engine, ids, window, keep_predictions=True)
        out[name] = dict(ppl=r["ppl"], nll=r["nll"], tokens=r["tokens"], predictions=r["predictions"],
                         seconds=r["seconds"])
    return out


def score_point(res: dict, base: dict) -> dict:
    from hobbit.lab.evaluate import agreement
    return {n: dict(ppl=r["ppl"], tokens=r["tokens"], seconds=r["seconds"],
                    top1=agreement(r["predictions"], base[n]["predictions"])) for n, r in res.items()}


def calibrate(store: Path, ids: list[int], window: int, trace: Path) -> dict:
    """Routing statistics of the full-precision model on calibration windows, with each token's top
    next-token probability and loss."""
    from hobbit.runtime.engine import load
    eng = load(store, policy="resident", trace=trace)
    p_top, nll = {}, {}
    with torch.inference_mode():
        for seq, b in enumerate(range(0, len(ids) - 1, window)):
            chunk = ids[b:b + window]
            logits = eng.logits(chunk)
            p = torch.softmax(logits, -1).max(-1).values
            loss = F.cross_entropy(logits[:-1], torch.tensor(chunk[1:]), reduction="none")
            for i in range(len(chunk)):
                p_top[(seq, i)] = float(p[i])
                if i < len(chunk) - 1:
                    nll[(seq, i)] = float(loss[i])
    eng.close()
    header, calls = read_trace(trace)
    stats = routing_stats(calls, p_top, nll)
    scores, total = eq2_scores(calls)
    return dict(stats=stats, tokens=len(ids), eq2_scores=scores, selections=total)


def kernel_times(store: Path, precisions: list[str], reps: int = 10, rounds: int = 30,
                 dtype: torch.dtype = torch.bfloat16) -> dict:
    """ms per expert FFN (w13, act, w2, its routing weight) at one token, per precision, and ms to read +
    prepare one blob into a slot: the fastest of `rounds` batches, the precisions interleaved within each round so that all see
    the same disturbance from other jobs on a shared machine (the first read verifies the checksum).
    `dtype`: the activations' (the engine's)."""
    from hobbit.runtime.offload import SlotPool
    from hobbit.store.format import ExpertStore
    st = ExpertStore(store)
    b = next(iter(st.blobs.values()))
    x = torch.randn(1, st.shapes()["w13"][1], dtype=dtype)
    pools = {p: SlotPool(st, p, 1, dtype) for p in precisions}
    best = {p: dict(expert=math.inf, load=math.inf) for p in precisions}
    with torch.inference_mode():
        for p, pool in pools.items():
            pool.load(0, b.layer, b.expert)
            for _ in range(10):
                pool.experts[0].weighted(x, 1.0)
        for _ in range(rounds):
            for p, pool in pools.items():
                t0 = time.perf_counter()
                pool.load(0, b.layer, b.expert)
                t1 = time.perf_counter()
                for _ in range(reps):
                    pool.experts[0].weighted(x, 1.0)  # what decode runs (one native call where it can)
                t2 = time.perf_counter()
                best[p] = dict(load=min(best[p]["load"], t1 - t0), expert=min(best[p]["expert"], (t2 - t1) / reps))
            time.sleep(0.01)
    out = {p: dict(expert_ms=best[p]["expert"] * 1e3, load_ms=best[p]["load"] * 1e3, slot_bytes=pools[p].slot_bytes,
                   disk_bytes=st.expert_nbytes(p)) for p in precisions}
    st.close()
    return out


def decode_ms(store: Path, tokens: int = 8, runs: int = 6) -> float:
    """Resident full-precision decode, ms per token (greedy from a fixed prompt): the fastest of `runs`
    short runs, the least disturbed by other jobs on a shared machine."""
    from hobbit.runtime.engine import load
    eng = load(store, policy="resident")
    eng.generate([100 + i for i in range(16)], max_new_tokens=4, stop_token_ids=[])  # warm-up
    best = max(eng.generate([100 + i for i in range(16)], max_new_tokens=tokens, stop_token_ids=[]
                            ).stats["decode_tok_s"] for _ in range(runs))
    eng.close()
    return 1e3 / best


def record_decode_trace(store: Path, ids: list[int], trace: Path) -> dict:
    """Teacher-forced decode (one token per pass) of `ids` under the resident engine, traced."""
    from hobbit.runtime.engine import load
    eng = load(store, policy="resident", trace=trace)
    eng.logits(ids, stepwise=True)
    eng.close()
    return dict(tokens=len(ids))


def simulate_config(header: dict, calls, opt: Options, budget_pct: float) -> dict:
    """Simulator counters for one config at a budget (% of all top-precision expert bytes), per decode
    token; {'infeasible': why} when the budget cannot hold one layer's active experts."""
    from hobbit.lab.simulate import parse_budget_for, simulate
    try:
        r = simulate(header, calls, opt, parse_budget_for(f"{budget_pct}%", header))
    except (ValueError, RuntimeError) as e:  # budget too small for one layer (or one token) at a tier
        return dict(infeasible=str(e))
    n = max(1, r["tokens"])
    return dict(tokens=r["tokens"], hit_rate=r["hit_rate"], demand_bytes_per_token=r["bytes_demand"] / n,
                prefetch_bytes_per_token=r["bytes_prefetch"] / n, low_share=r["low_share"],
                selections_per_token={p: c / n for p, c in r["selections_by_precision"].items()})
