"""`hobbit tune`: calibrate HOBBIT's settings for one store and budget with the simulator.

1. Record a calibration routing trace and measure a time model with the live engine
   (`hobbit.lab.calibration`).
2. Search with `hobbit.lab.simulate`, minimizing the objective:
   - `time` (default): modeled decode ms per token (`hobbit.lab.timeline`: one disk queue shared
     by demand loads and prefetches, each read taking its measured time, and the compute between).
   - `penalty`: HOBBIT's (§3.2, §3.4: "determined by minimizing the mixed-precision cache miss
     penalty on a calibration dataset") `C·misses_high + C·(B_low/B_high)·misses_low` (B = bytes
     one expert load reads from disk). It counts demand loads only, by their bytes: it cannot see
     prefetches that fill the disk (bf16 experts on CoderMoE: the paper's thresholds decoded 14%
     faster live than its choice), nor what a read costs beyond its bytes (an int2 read took 0.8-1.7x
     an int4 read on the dev box while int2 was expanded for torch's int4 kernel at load, not the
     0.6x its bytes say).
   Stages:
   a. T1/T2 of Eq. 2. Quality limits (defaults in the spirit of the paper's 67/30/3 split): at
      most `max_low` of the token-expert selections computed at low precision and `max_skip`
      skipped. A pair must respect them both as Eq. 2 *requests* them (the paper's statistic;
      it does not depend on the budget) and as the simulation *serves* them. Requested shares
      are exact and cheap, so only the pairs on the feasible frontier (per T2 the lowest
      feasible T1: lower thresholds load less) are simulated, plus the paper's (0.6, 0.9) and
      all-high (1, 1), each with the low pool its requests would fill (`matched_pool`), not one
      it leaves empty. Then the quality limit `max_dppl` (default 1%): in the objective's order, a
      pair is kept only if Eq. 2's per-token rule at its thresholds raises the perplexity of
      held-aside calibration windows by at most that much (`study_measure.RuleQuality`: both tiers resident, no
      cache, so an upper bound of the live loss); a pair over it adds the next T1 up at its T2 to
      the candidates (each measured pair costs a simulation and one pass over those windows). The
      shares alone do not bound quality: an int2 tier under int4 asked for 24.5% of CoderMoE's
      selections cost +5.4 points of perplexity live. Skipped, with a note, where the two tiers do
      not fit in RAM together.
   b. the share of the budget for low-precision copies, with (a)'s thresholds (skipped when (a) chose
      t1 = 1: nothing is then loaded low, and the whole budget holds high copies);
   c. the Eq. 3 eviction weights, a grid over the simplex, with (a) and (b).
   Each stage keeps the incumbent unless a setting lowers the objective, so the result is never
   worse than the defaults it starts from.
3. Add the result to STORE/hobbit_tuned.json ({"results": [...]}, one per high/low/budget; this run's
   replaces an earlier one for the same three): {"options": {t1, t2, low_pool_fraction,
   eviction_options}, "budget_bytes", "calibration", "search"}; `read_tuned(store)` lists them.
"""
from __future__ import annotations

import argparse
import bisect
import itertools
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

from hobbit.policies.eviction import DEFAULT_MULTIDIM_WEIGHTS
from hobbit.policies.precision import TOLERANCE, scores
from hobbit.runtime.options import Options
from hobbit.lab.calibration import DEFAULT_TEXT, fit_reads, quality_probe, record_calibration
from hobbit.lab.simulate import default_precisions, simulate
from hobbit.lab.timeline import TimeModel
from hobbit.runtime.config import RunConfig, add_json_arg, add_run_args, emit_json, read_tuned, tuned_path, write_tuned
from hobbit.runtime.trace import LayerCall, read_trace

THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(21))  # 0, 0.05, ..., 1
POOL_FRACTIONS = (0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5)
PAPER_T = (0.6, 0.9)
OBJECTIVES = ("time", "penalty")


# -- search -----------------------------------------------------------------------------------------

class RequestedShares:
    """Eq. 2's requested tiers over all token-expert selections of a trace, for any (T1, T2): the
    unimportance scores of every non-top-1 selection, sorted once."""

    def __init__(self, calls: list[LayerCall]):
        self.total = 0
        s: list[float] = []
        for c in calls:
            for w in c.w:
                self.total += len(w)
                s.extend(scores(w)[1:])  # the top-1 expert is always high
        s.sort()
        self.sorted = s

    def __call__(self, t1: float, t2: float) -> tuple[float, float]:
        """(low share, skip share) of all selections."""
        n = len(self.sorted)
        upto_t1 = bisect.bisect_right(self.sorted, t1 + TOLERANCE)
        upto_t2 = bisect.bisect_right(self.sorted, t2 + TOLERANCE)
        total = max(1, self.total)
        return (upto_t2 - upto_t1) / total, (n - upto_t2) / total


def simplex(step: float) -> list[dict[str, float]]:
    """Eq. 3 weights on a grid over the simplex (every weight a multiple of `step`, summing to 1)."""
    n = round(1 / step)
    if n < 1 or abs(n * step - 1) > 1e-9:
        raise ValueError(f"weight step {step} must divide 1 (e.g. 0.25, 1/3, 0.5)")
    names = list(DEFAULT_MULTIDIM_WEIGHTS)
    out = []
    for parts in itertools.product(range(n + 1), repeat=len(names) - 1):
        if sum(parts) <= n:
            ks = (*parts, n - sum(parts))
            out.append({name: float(Fraction(k, n)) for name, k in zip(names, ks)})
    return out


def search(header: dict, calls: list[LayerCall], budget_bytes: int, high: str, low: str,
           max_low: float = 0.30, max_skip: float = 0.03, thresholds=THRESHOLDS, pool_fractions=POOL_FRACTIONS,
           weight_step: float = 0.25, prefetch_depth: int | None = None, progress=None,
           time_model: TimeModel | None = None, quality=None, max_dppl: float = 1.0) -> dict:
    """The three-stage search (module docstring), minimizing the modeled decode ms per token under
    `time_model`, or the miss penalty when it is None. quality: (t1, t2) -> perplexity cost in % (None:
    the share limits alone), at most `max_dppl`. Returns {"options", "result", "baseline", "search"}."""
    if not (0 <= max_low <= 1 and 0 <= max_skip <= 1):
        raise ValueError(f"quality limits are shares in [0, 1], got max_low={max_low}, max_skip={max_skip}")
    cost = "ms_per_token" if time_model else "penalty"
    unit = "modeled ms/token" if time_model else "miss penalty"
    requested = RequestedShares(calls)
    rows: list[dict] = []

    def run(stage: str, t1: float, t2: float, frac: float, weights: dict) -> dict:
        req_low, req_skip = requested(t1, t2)
        row = dict(stage=stage, t1=t1, t2=t2, low_pool_fraction=frac, weights=weights,
                   requested_low_share=req_low, requested_skip_share=req_skip)
        opt = Options(policy="hobbit", high=high, low=low, t1=t1, t2=t2, low_pool_fraction=frac,
                      prefetch_depth=prefetch_depth, eviction_options={"weights": weights})
        try:
            r = simulate(header, calls, opt, budget_bytes, time_model=time_model)
        except ValueError as e:  # e.g. the high pool is below one layer's active experts
            row.update(feasible=False, penalty=None, ms_per_token=None, note=str(e))
        else:
            feasible = max(req_low, r["low_share"]) <= max_low + 1e-12 and \
                max(req_skip, r["skip_share"]) <= max_skip + 1e-12
            row.update(feasible=feasible, penalty=r["miss_penalty"], hit_rate=r["hit_rate"],
                       ms_per_token=r["modeled"]["decode_ms_per_token"] if time_model else None,
                       low_share=r["low_share"], skip_share=r["skip_share"], misses=r["misses_by_precision"],
                       bytes_demand=r["bytes_demand"], bytes_prefetch=r["bytes_prefetch"])
            if not feasible:
                row["note"] = "exceeds the quality limits"
        rows.append(row)
        return row

    def report(stage: str, row: dict) -> None:
        if progress:
            progress(f"  best {stage}: t1 {row['t1']:g} t2 {row['t2']:g} low pool {row['low_pool_fraction']:g} "
                     f"weights {_w(row['weights'])}: {unit} {row[cost]:.1f}")

    def best(candidates: list[dict], incumbent: dict | None) -> dict | None:
        ok = [r for r in candidates if r["feasible"]]
        if incumbent is not None and incumbent["feasible"]:
            ok = [incumbent] + [r for r in ok if r is not incumbent]
        # lowest objective; ties: lower requested low+skip (quality), then the incumbent / earlier row
        return min(ok, key=lambda r: (round(r[cost], 9), r["requested_low_share"] + r["requested_skip_share"]),
                   default=None)

    w0 = dict(DEFAULT_MULTIDIM_WEIGHTS)
    f0 = Options.low_pool_fraction
    # baseline: full precision LRU at the same budget (for the summary)
    base = simulate(header, calls, Options(policy="lru", high=high), budget_bytes, time_model=time_model)
    baseline = dict(policy="lru", penalty=base["miss_penalty"], hit_rate=base["hit_rate"],
                    bytes_demand=base["bytes_demand"],
                    ms_per_token=base["modeled"]["decode_ms_per_token"] if time_model else None)

    # stage a: thresholds on the frontier of the requested-share limits
    ts = sorted(set(thresholds) | set(PAPER_T) | {1.0})
    pairs = []
    for t2 in ts:
        feasible_t1 = [t1 for t1 in ts if t1 <= t2 and _within(requested(t1, t2), max_low, max_skip)]
        if feasible_t1:
            pairs.append((min(feasible_t1), t2))
    pairs = sorted(set(pairs) | {PAPER_T, (1.0, 1.0)}, key=lambda p: (-p[1], -p[0]))
    if progress:
        progress(f"stage 1: thresholds ({len(pairs)} of {len(ts) * (len(ts) + 1) // 2} pairs on the feasible frontier)")
    ratio = int(header["expert_ram_bytes"][low]) / int(header["expert_ram_bytes"][high])
    pool = lambda t1, t2: matched_pool(requested(t1, t2)[0], ratio, pool_fractions, f0)  # noqa: E731
    stage1 = [run("thresholds", t1, t2, pool(t1, t2), w0) for t1, t2 in pairs]
    chosen = best(stage1, None)
    while quality is not None and chosen is not None and not _keeps_quality(chosen, quality, max_dppl, progress):
        # over the limit: try the next T1 up at this T2 (fewer selections low), then the fastest again;
        # all-high (1, 1) always passes
        up = [t1 for t1 in ts if chosen["t1"] < t1 <= chosen["t2"]]
        if up and not any((r["t1"], r["t2"]) == (up[0], chosen["t2"]) for r in stage1):
            stage1.append(run("thresholds", up[0], chosen["t2"], pool(up[0], chosen["t2"]), w0))
        chosen = best(stage1, None)
    if chosen is None:
        notes = "; ".join(sorted({r.get("note", "") for r in stage1}))
        raise ValueError(f"no HOBBIT setting fits budget {budget_bytes} bytes within the quality limits: {notes}")
    report("thresholds", chosen)

    if Options(policy="hobbit", high=high, low=low, t1=chosen["t1"], t2=chosen["t2"]).two_tiers:  # else one pool
        if progress:
            progress(f"stage 2: low-pool fraction ({len(pool_fractions)} values)")
        stage2 = [chosen if f == chosen["low_pool_fraction"] else
                  run("low_pool_fraction", chosen["t1"], chosen["t2"], f, w0) for f in pool_fractions]
        chosen = best(stage2, chosen)
        report("low-pool fraction", chosen)
    elif progress:
        progress("stage 2: skipped (t1 = 1: no low copies, so no low pool)")

    grid = simplex(weight_step)
    if progress:
        progress(f"stage 3: Eq. 3 weights ({len(grid)} points on the simplex, step {weight_step:g})")
    stage3 = [chosen if w == chosen["weights"] else run("weights", chosen["t1"], chosen["t2"],
                                                          chosen["low_pool_fraction"], w) for w in grid]
    chosen = best(stage3, chosen)
    report("weights", chosen)

    options = dict(t1=chosen["t1"], t2=chosen["t2"], low_pool_fraction=chosen["low_pool_fraction"],
                   eviction_options={"weights": chosen["weights"]})
    default = next((r for r in stage1 if (r["t1"], r["t2"]) == PAPER_T), None)
    return dict(options=options, result=chosen, baseline=baseline, paper_default=default, search=rows)


def matched_pool(low_share: float, ratio: float, fractions, default: float) -> float:
    """The low pool a pair's requests would fill: of the bytes of copies held in the proportion Eq. 2 asks
    for them (`low_share` of the selections low, each `ratio` of a high copy's RAM), the low copies' share,
    snapped to the nearest of `fractions` (ties: the smaller); `default` when nothing is asked low."""
    if low_share <= 0:
        return default
    share = low_share * ratio / (low_share * ratio + 1 - low_share)
    return min(fractions, key=lambda f: (abs(f - share), f))


def _keeps_quality(row: dict, quality, max_dppl: float, progress) -> bool:
    """Measure row's thresholds (nothing to measure where Eq. 2 asks for neither low nor skip); a row over
    the limit becomes infeasible, with a note."""
    if row["requested_low_share"] + row["requested_skip_share"] == 0:
        return True
    row["dppl_pct"] = dppl = quality(row["t1"], row["t2"])
    ok = dppl <= max_dppl + 1e-12
    if progress:
        progress(f"  quality at t1 {row['t1']:g} t2 {row['t2']:g}: perplexity {dppl:+.2f}% "
                 f"({'within' if ok else 'over'} the {max_dppl:g}% limit)")
    if not ok:
        row.update(feasible=False, note=f"perplexity {dppl:+.2f}% over the {max_dppl:g}% limit")
    return ok


def _within(shares: tuple[float, float], max_low: float, max_skip: float) -> bool:
    return shares[0] <= max_low + 1e-12 and shares[1] <= max_skip + 1e-12


def _w(weights: dict) -> str:
    return "/".join(f"{weights[k]:.2f}" for k in DEFAULT_MULTIDIM_WEIGHTS)


# -- the command ------------------------------------------------------------------------------------

def tune(store: str | Path, budget, text=None, tokens: int = 256, seq_len: int = 128, prompt_len: int = 16,
         high: str | None = None, low: str | None = None, max_low: float = 0.30, max_skip: float = 0.03,
         weight_step: float = 0.25, save_trace: str | Path | None = None, progress=None,
         prefetch_depth: int | None = None, objective: str = "time", max_dppl: float = 1.0,
         quality_tokens: int = 1024, **engine_knobs) -> dict:
    """Record a calibration trace and a time model, search for the lowest `objective` ("time": modeled
    decode ms per token; "penalty": the miss penalty) within the share limits and, unless max_dppl is
    inf, the perplexity limit measured on `quality_tokens` calibration tokens after the first `tokens`;
    add the result to STORE/hobbit_tuned.json; returns the result."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose from {', '.join(OBJECTIVES)}")
    if not max_dppl >= 0 or quality_tokens < 2:
        raise ValueError(f"the perplexity limit needs max_dppl >= 0 (a percentage, or inf for none) and at least "
                         f"2 quality tokens; got max_dppl={max_dppl}, quality_tokens={quality_tokens}")
    store = Path(store)
    read_tuned(store)  # a broken file fails now, not after the calibration run
    with tempfile.TemporaryDirectory(prefix="hobbit-tune-") as tmp:
        trace_path = Path(save_trace) if save_trace else Path(tmp) / "calibration.trace.gz"
        if progress:
            progress(f"recording a calibration trace ({tokens} tokens) with the engine")
        calibration = record_calibration(store, budget, trace_path, text=text, tokens=tokens, seq_len=seq_len,
                                         prompt_len=prompt_len, high=high, progress=progress, **engine_knobs)
        header, calls = read_trace(trace_path)
    high, low = default_precisions(header, "hobbit", calibration["high"], low)
    if low is None or low == high:
        raise ValueError(f"policy hobbit needs a low precision other than {high}; the store has "
                         f"{', '.join(header['precisions'])} (pass --low)")
    if low not in header["precisions"]:
        raise ValueError(f"low precision {low!r} is not in the store (it has {', '.join(header['precisions'])})")
    budget_bytes = calibration.pop("budget_bytes")
    t0 = time.perf_counter()
    measured = TimeModel.from_dict(calibration["time_model"])
    fitted, fit = fit_reads(measured, header, calls, budget_bytes, high, calibration["decode_ms_per_token"])
    calibration.update(time_model=fitted.as_dict(), read_fit=dict(fit, measured_read_ms=dict(measured.read_ms)))
    time_model = fitted if objective == "time" else None
    probe, quality = quality_probe(store, text, tokens, quality_tokens, seq_len, high, low, max_dppl, progress,
                                   engine_knobs)
    try:
        found = search(header, calls, budget_bytes, high, low, max_low=max_low, max_skip=max_skip,
                       weight_step=weight_step, prefetch_depth=prefetch_depth, progress=progress,
                       time_model=time_model, quality=probe, max_dppl=max_dppl)
    finally:
        if probe is not None:
            probe.close()
    if probe is not None:
        quality.update(base_ppl=probe.base_ppl, measured=[dict(t1=t1, t2=t2, dppl_pct=d)
                                                          for (t1, t2), d in probe.measured.items()])
    calibration.update(high=high, low=low, limits=dict(max_low=max_low, max_skip=max_skip, max_dppl=max_dppl),
                       quality=quality,
                       search_s=round(time.perf_counter() - t0, 3), result=found["result"],
                       baseline_lru=found["baseline"], paper_default=found["paper_default"], objective=objective,
                       trace=str(save_trace) if save_trace else None)
    doc = dict(options=found["options"], budget_bytes=budget_bytes, calibration=calibration, search=found["search"])
    write_tuned(store, doc)
    return doc


def format_summary(doc: dict, path: Path) -> str:
    c, o = doc["calibration"], doc["options"]
    r, b, d = c["result"], c["baseline_lru"], c["paper_default"]
    timed = c.get("objective") == "time"

    def ms(row) -> str:
        return f"{row['ms_per_token']:.1f}" if row and row.get("ms_per_token") is not None else "-"

    def score(row) -> str:
        return f"{ms(row)} ms/token" if timed else f"miss penalty {row['penalty']:.1f}"
    lines = [f"calibration: {c['tokens']} tokens of {c['text']} in {c['sequences']} sequences; high {c['high']}, "
             f"low {c['low']}; budget {doc['budget_bytes'] / 2**20:.1f} MiB; limits low <= {c['limits']['max_low']:.0%}, "
             f"skip <= {c['limits']['max_skip']:.0%}; objective: " + ("modeled decode time" if timed else "miss penalty"),
             f"{'stage':<18} {'t1':>5} {'t2':>5} {'lowpool':>7} {'weights lru/lfu/lhu/fld':>24} {'penalty':>9} "
             f"{'ms/tok':>7} {'hit':>6} {'low':>6} {'skip':>6}  note"]
    for row in doc["search"]:
        pen = f"{row['penalty']:.1f}" if row["penalty"] is not None else "-"
        hit = f"{row['hit_rate']:.1%}" if "hit_rate" in row else "-"
        low = f"{max(row['requested_low_share'], row.get('low_share', 0)):.1%}"
        skip = f"{max(row['requested_skip_share'], row.get('skip_share', 0)):.1%}"
        mark = "*" if row is r or row == r else ""
        lines.append(f"{row['stage']:<18} {row['t1']:>5g} {row['t2']:>5g} {row['low_pool_fraction']:>7g} "
                     f"{_w(row['weights']):>24} {pen:>9} {ms(row):>7} {hit:>6} {low:>6} {skip:>6}  "
                     f"{mark}{row.get('note', '')}")
    lines.append(f"chosen: t1 {o['t1']:g}, t2 {o['t2']:g}, low pool {o['low_pool_fraction']:g}, weights "
                 f"{_w(o['eviction_options']['weights'])}: {score(r)} (full-precision lru {score(b)}"
                 + (f", paper's t1 0.6 t2 0.9 {score(d)}" + ("" if d["feasible"] else " but over the limits")
                    if d and d["penalty"] is not None else "")
                 + f"); hit rate {r['hit_rate']:.1%}")
    q = c.get("quality") or {}
    if "measured" in q:
        lines.append(f"quality: perplexity limit +{q['max_dppl']:g}% on {q['tokens']} held-aside tokens of {q['text']} "
                     f"(all-high {q['base_ppl']:.2f}): " + (", ".join(
                         f"t1 {m['t1']:g} t2 {m['t2']:g} {m['dppl_pct']:+.2f}%" for m in q["measured"]) or "nothing to measure"))
    elif q.get("note"):
        lines.append(f"quality: {q['note']}")
    if "read_fit" in c:  # results written before the time model have none
        m, fit = c["time_model"], c["read_fit"]
        lines.append("time model: reads " + ", ".join(f"{p} {t:.2f}" for p, t in m["read_ms"].items())
                     + f" ms (measured x {fit['scale']:.2f}: the calibration run's {fit['observed_ms']:.1f} ms/token "
                     f"replays as {fit['modeled_ms']:.1f}); experts " + ", ".join(f"{p} {t:.3f}" for p, t in m["expert_ms"].items())
                     + f" ms; {m['layer_ms']:.2f} ms per MoE layer besides; LM head {m['step_ms']:.1f} ms")
    lines.append(f"wrote {path}")
    return "\n".join(lines)


SEARCHED = ("t1", "t2", "low_pool_fraction", "weights")  # what tune chooses: not knobs to pass it
UNUSED = ("little", "little_rule", "little_weights", "gamma")


def add_tune_args(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("tune", help="calibrate HOBBIT's thresholds, low-pool share and eviction weights "
                              "for a store and budget (writes STORE/hobbit_tuned.json)")
    add_run_args(p)
    p.add_argument("--text", default=None, help=f"calibration text: a name (austen:<novel>, austen, wiki; its train "
                   f"split) or a plain-text FILE (default {DEFAULT_TEXT})")
    p.add_argument("--tokens", type=int, default=256, help="calibration tokens (default 256)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per calibration sequence (default 128)")
    p.add_argument("--prompt-len", type=int, default=16, help="prefill tokens per sequence (default 16)")
    p.add_argument("--max-low", type=float, default=0.30, help="most selections at low precision (default 0.30)")
    p.add_argument("--max-skip", type=float, default=0.03, help="most selections skipped (default 0.03)")
    p.add_argument("--max-dppl", type=float, default=1.0, help="most perplexity increase in %% of Eq. 2's rule over "
                   "all-high on held-aside calibration tokens (default 1; inf: the share limits alone)")
    p.add_argument("--quality-tokens", type=int, default=1024, help="calibration tokens after --tokens that "
                   "the perplexity limit is measured on (default 1024)")
    p.add_argument("--weight-step", type=float, default=0.25, help="grid step over the Eq. 3 weight simplex "
                   "(default 0.25: 35 points)")
    p.add_argument("--save-trace", default=None, help="keep the calibration trace here (for `hobbit simulate`)")
    p.add_argument("--objective", choices=OBJECTIVES, default="time", help="what the search minimizes: time, the "
                   "modeled decode time per token (reads on one disk queue, measured read and compute times; "
                   "default), or penalty, HOBBIT's miss penalty (demand loads weighted by bytes)")
    add_json_arg(p, "the written tuning result")
    p.set_defaults(func=cmd_tune)
    return p


def cmd_tune(args: argparse.Namespace) -> int:
    if args.tokens < 2:
        raise ValueError(f"--tokens must be at least 2, got {args.tokens}")
    given = [k for k in (*SEARCHED, *UNUSED) if getattr(args, k) is not None] + \
        (["allow_low_for_high"] if args.allow_low_for_high else [])
    if given or args.policy not in ("lru", "hobbit"):
        raise ValueError(f"hobbit tune records with policy lru and searches policy hobbit's thresholds, low pool and "
                         f"weights; it takes no --{', --'.join(k.replace('_', '-') for k in given) or 'policy'}")
    cfg = RunConfig.from_args(args)
    engine = {k: v for k, v in cfg.engine_kwargs().items() if k in ("dtype", "dense", "mlock", "threads",
                                                                    "direct_io", "io_threads", "prefetch_threads")}
    say = None if args.json == "-" else (lambda m: print(m, file=sys.stderr, flush=True))
    doc = tune(args.store, args.budget, text=args.text, tokens=args.tokens, seq_len=args.seq_len,
               prompt_len=args.prompt_len, high=cfg.high, low=cfg.low, max_low=args.max_low,
               max_skip=args.max_skip, weight_step=args.weight_step, save_trace=args.save_trace, progress=say,
               prefetch_depth=args.prefetch_depth, objective=args.objective, max_dppl=args.max_dppl,
               quality_tokens=args.quality_tokens, **engine)
    if not emit_json(args, doc):
        print(format_summary(doc, tuned_path(args.store)))
    return 0
