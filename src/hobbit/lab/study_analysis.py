"""`hobbit study`'s analysis: `derive` adds every derived number (ppl ratios, the uniform frontier at
equal bytes, the signal ranking, resident-expert gains, modeled decode speed per link, the decision) to
study.json; `summarize` answers across stores; `fmt` is how every number is printed (study_report)."""
from __future__ import annotations

QUALITY_TOL_PCT = 1.0  # a config "keeps quality" when its mean perplexity rises by at most this much
LOOSE_TOL_PCT = 5.0  # the same decision with a looser quality bar
WORTH_SPEEDUP = 1.10  # ... and it is "worth it" when that makes decode this much faster than both baselines

# the formats every number in the report goes through (the test formats the JSON's numbers with these)
FMT = {"f2": "{:.2f}", "f3": "{:.3f}", "f4": "{:.4f}", "pct": "{:.1%}", "i": "{:d}", "g": "{:.3g}",
       "sx": "{:.2f}x"}


def fmt(v, kind: str) -> str:
    if v is None:
        return "–"
    if kind == "i":
        return FMT["i"].format(int(v))
    return FMT[kind].format(v)


# -- derived numbers -----------------------------------------------------------------------------------

def _mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def derive(s: dict, links: list[float]) -> dict:
    """The analysis of one store entry of study.json (added as s['analysis'])."""
    base = next(p for p in s["points"] if p["kind"] == "baseline")
    disk, n = s["disk_bytes"], s["experts"]
    for p in s["points"]:
        p["ppl_ratio"] = {t: v["ppl"] / base["texts"][t]["ppl"] for t, v in p["texts"].items()}
        p["dppl_pct"] = 100 * (_mean(p["ppl_ratio"].values()) - 1)
        p["top1"] = _mean(v["top1"] for v in p["texts"].values())
        if p["kind"] in ("static", "native"):
            p["bytes_per_expert"] = ((n - p["low_experts"]) * disk[p["high"]] + p["low_experts"] * disk[p["fmt"]]) / n
        elif p["kind"] == "dynamic":  # traffic-weighted: the share of selections computed low
            sh = p["low_selection_share"]
            p["bytes_per_expert"] = (1 - sh) * disk[p["high"]] + sh * disk[p["fmt"]]
        else:
            p["bytes_per_expert"] = disk[p["fmt"]]
        p["bytes_share"] = p["bytes_per_expert"] / disk[s["high"]]
    frontier = sorted(((p["bytes_per_expert"], p["dppl_pct"]) for p in s["points"]
                       if p["kind"] in ("baseline", "uniform")))
    for p in s["points"]:
        p["frontier_dppl_pct"] = _interp(frontier, p["bytes_per_expert"])
        p["vs_uniform_pct"] = p["dppl_pct"] - p["frontier_dppl_pct"] if p["frontier_dppl_pct"] is not None else None
    a = dict(signals=_signal_table(s), gain=_gain(s), speed=_speed(s, links), kernels=_kernels(s),
             rest_ms=_rest_ms(s), expert_ms_per_token=s["sparse_layers"] * s["top_k"] * s["kernels"][s["high"]]["expert_ms"])
    a["decision"] = _decide(s, a, links, QUALITY_TOL_PCT)
    a["decision_loose"] = _decide(s, a, links, LOOSE_TOL_PCT)
    a["findings"] = _findings(s, a)
    s["analysis"] = a
    return s


def _findings(s: dict, a: dict) -> dict:
    """The numbers the report's findings quote: uniform tiers, signal spread, static vs dynamic and
    below-native points at equal X, the 2-bit path's kernel and RAM cost."""
    pts = s["points"]
    uni = {p["fmt"]: dict(dppl=p["dppl_pct"], top1=p["top1"], bytes_share=p["bytes_share"])
           for p in pts if p["kind"] == "uniform"}
    sig = a["signals"]
    best = sig[0]["signal"] if sig else None
    pairs = []
    for p in pts:
        if p["kind"] == "dynamic":
            q = next((q for q in pts if q["kind"] == "static" and q["signal"] == best and q["fmt"] == p["fmt"]
                      and q["fraction"] == p["fraction"]), None)
            if q:
                pairs.append(dict(fmt=p["fmt"], fraction=p["fraction"], dynamic=p["dppl_pct"], static=q["dppl_pct"],
                                  dynamic_low_share=p["low_selection_share"], static_low_share=q["low_selection_share"]))
    native = [dict(fmt=p["fmt"], signal=p["signal"], fraction=p["fraction"], dppl=p["dppl_pct"], top1=p["top1"],
                   bytes_share=p["bytes_share"], vs_uniform=p["vs_uniform_pct"])
              for p in pts if p["kind"] == "native" and p["signal"] == best]
    k = a["kernels"]
    int4 = [p["dppl_pct"] for p in pts if p["kind"] in ("static", "dynamic", "uniform") and p["fmt"] == "int4"]
    return dict(uniform=uni, int4_points=len(int4), int4_spread=max(int4) - min(int4) if int4 else None,
                int4_min=min(int4) if int4 else None, int4_max=max(int4) if int4 else None, best_signal=best, best_dppl=sig[0]["mean_dppl_pct"] if sig else None,
                worst_signal=sig[-1]["signal"] if sig else None, worst_dppl=sig[-1]["mean_dppl_pct"] if sig else None,
                static_vs_dynamic=pairs, native=native,
                int2_vs_int4_ms=k["int2"]["vs_int4"] if "int2" in k and "int4" in k else None,
                int2_load_ms=k.get("int2", {}).get("load_ms"), int4_load_ms=k.get("int4", {}).get("load_ms"),
                int2_vs_int4_ram=(s["ram_bytes"]["int2"] / s["ram_bytes"]["int4"]) if {"int2", "int4"} <= set(
                    s["ram_bytes"]) else None,
                int2_vs_int4_disk=(s["disk_bytes"]["int2"] / s["disk_bytes"]["int4"]) if {"int2", "int4"} <= set(
                    s["disk_bytes"]) else None)


def findings_md(s: dict) -> list[str]:
    f = s["analysis"]["findings"]
    L = [f"### {s['store']}: findings", ""]
    for t, u in f["uniform"].items():
        L.append(f"- Uniform {t} (all experts): Δppl {fmt(u['dppl'], 'f2')}%, top-1 {fmt(u['top1'], 'pct')}, at "
                 f"{fmt(u['bytes_share'], 'pct')} of the top tier's expert bytes.")
    if f["int4_spread"] is not None:
        L.append(f"- Noise: the {fmt(f['int4_points'], 'i')} points that re-quantize experts to int4 (the native bit "
                 f"width, nearly lossless) scatter from {fmt(f['int4_min'], 'f2')}% to {fmt(f['int4_max'], 'f2')}% "
                 f"({fmt(f['int4_spread'], 'f2')} points): Δppl differences smaller than that are within the noise "
                 "of these held-out windows.")
    if f["best_signal"]:
        L.append(f"- Signal: `{f['best_signal']}` ranks first (mean Δppl {fmt(f['best_dppl'], 'f2')}% over its static "
                 f"points), `{f['worst_signal']}` last ({fmt(f['worst_dppl'], 'f2')}%).")
    for p in f["static_vs_dynamic"]:
        L.append(f"- {p['fmt']} at X = {fmt(p['fraction'], 'i')}%: dynamic (per token) Δppl {fmt(p['dynamic'], 'f2')}% "
                 f"({fmt(p['dynamic_low_share'], 'pct')} of held-out selections low) vs static `{f['best_signal']}` "
                 f"{fmt(p['static'], 'f2')}% ({fmt(p['static_low_share'], 'pct')} of selections low).")
    for p in f["native"]:
        L.append(f"- Below native: int4 + bottom {fmt(p['fraction'], 'i')}% at {p['fmt']} by `{p['signal']}`: Δppl "
                 f"{fmt(p['dppl'], 'f2')}%, top-1 {fmt(p['top1'], 'pct')}, {fmt(p['bytes_share'], 'pct')} of the "
                 f"top-tier bytes; vs the uniform stores at those bytes {fmt(p['vs_uniform'], 'f2')} points.")
    if f["int2_vs_int4_ms"] is not None:
        L.append(f"- The 2-bit path: an int2 expert computes in {fmt(f['int2_vs_int4_ms'], 'sx')} the int4 time, its "
                 f"blob is {fmt(f['int2_vs_int4_disk'], 'sx')} int4's on disk and its RAM slot "
                 f"{fmt(f['int2_vs_int4_ram'], 'sx')} int4's"
                 f"{' (the slot holds an expanded form as well)' if f['int2_vs_int4_ram'] > 1 else ''}, "
                 f"and a load (read, any expansion) takes {fmt(f['int2_load_ms'], 'f3')} ms against int4's "
                 f"{fmt(f['int4_load_ms'], 'f3')} ms from the page cache.")
    return L + [""]


def _interp(frontier, b):
    """Δppl of the uniform stores, linear in bytes between the two around b (None outside their range)."""
    for (b1, q1), (b2, q2) in zip(frontier, frontier[1:]):
        if b1 <= b <= b2:
            return q1 if b2 == b1 else q1 + (q2 - q1) * (b - b1) / (b2 - b1)
    return None


def _signal_table(s: dict) -> list[dict]:
    from hobbit.lab.study_measure import spearman
    rows = []
    keys = sorted(s["signals"]["hybrid"])
    ev = s["eval_stats"]
    tok = ev["tokens"]
    eval_sig = {"frequency": [ev["experts"].get(k, {}).get("n", 0) / max(1, tok.get(k.split("/")[0], 0)) for k in keys],
                "hybrid": [ev["experts"].get(k, {}).get("w", 0.0) / max(1, tok.get(k.split("/")[0], 0)) for k in keys],
                "weight": [ev["experts"].get(k, {}).get("w", 0.0) / max(1, ev["experts"].get(k, {}).get("n", 0))
                           for k in keys]}
    static = [p for p in s["points"] if p["kind"] == "static"]
    for sig in sorted({p["signal"] for p in static}):
        pts = [p for p in static if p["signal"] == sig]
        row = dict(signal=sig, points=len(pts), mean_dppl_pct=_mean(p["dppl_pct"] for p in pts),
                   mean_top1=_mean(p["top1"] for p in pts),
                   by_fmt={f: _mean(p["dppl_pct"] for p in pts if p["fmt"] == f) for f in sorted({p["fmt"] for p in pts})},
                   stability=spearman([s["signals"][sig][k] for k in keys], eval_sig[sig]) if sig in eval_sig else None)
        for x in (25, 50):
            q = next((p for p in pts if p["fraction"] == x), None)
            row[f"low_mass_{x}"] = q["low_mass_share"] if q else None
        rows.append(row)
    rows.sort(key=lambda r: (r["mean_dppl_pct"], -r["mean_top1"]))
    for i, r in enumerate(rows):
        r["rank"] = i + 1
    return rows


def _gain(s: dict) -> list[dict]:
    total = s["experts"] * s["disk_bytes"][s["high"]]
    out = []
    for b in s["setup_budgets"]:
        budget = total * b / 100
        held = {p: min(s["experts"], int(budget // r)) for p, r in s["ram_bytes"].items()}
        out.append(dict(budget=b, budget_bytes=budget, held=held,
                        gain={p: held[p] / held[s["high"]] if held[s["high"]] else None for p in held}))
    return out


def _kernels(s: dict) -> dict:
    k = s["kernels"]
    hi = k[s["high"]]["expert_ms"]
    ref4 = k.get("int4", {}).get("expert_ms")
    return {p: dict(v, vs_high=v["expert_ms"] / hi, vs_int4=v["expert_ms"] / ref4 if ref4 else None)
            for p, v in k.items()}


def _speed(s: dict, links: list[float]) -> list[dict]:
    """Modeled decode: compute (the measured resident decode, with each selection at its precision's
    measured expert time) + demand reads / link + prefetch reads beyond the compute / link."""
    k = s["kernels"]
    rest = _rest_ms(s)
    quality = {_cfg_key(p): p for p in s["points"]}
    rows = []
    for r in s["sims"]:
        c = next(c for c in s["sim_configs"] if c["name"] == r["config"])
        q = quality.get(_cfg_key(c))
        for link in links:
            row = dict(config=r["config"], kind=c["kind"], budget=r["budget"], link=link,
                       dppl_pct=q["dppl_pct"] if q else None, top1=q["top1"] if q else None)
            if "infeasible" in r:
                rows.append(dict(row, tok_s=None))
                continue
            compute = rest + sum(n * k[p]["expert_ms"] for p, n in r["selections_per_token"].items())
            demand = r["demand_bytes_per_token"] / (link * 1e9) * 1e3
            prefetch = max(0.0, r["prefetch_bytes_per_token"] / (link * 1e9) * 1e3 - compute)
            rows.append(dict(row, compute_ms=compute, load_ms=demand + prefetch, hit_rate=r["hit_rate"],
                             tok_s=1e3 / (compute + demand + prefetch)))
    for row in rows:
        ref = next(x for x in rows if x["kind"] == "baseline" and x["budget"] == row["budget"] and x["link"] == row["link"])
        row["speedup"] = row["tok_s"] / ref["tok_s"] if row["tok_s"] and ref["tok_s"] else None
    return rows


def _rest_ms(s: dict) -> float:
    """Decode time per token outside the routed experts: the measured resident decode less k x layers
    expert times at the top tier."""
    return max(0.0, s["decode_ms"] - s["sparse_layers"] * s["top_k"] * s["kernels"][s["high"]]["expert_ms"])


def _cfg_key(c: dict):
    kind = c["kind"]
    if kind == "baseline":
        return ("baseline",)
    if kind == "uniform":
        return ("uniform", c["fmt"])
    if kind == "dynamic":
        return ("dynamic", c["fmt"], c["fraction"])
    return (kind, c["fmt"], c.get("signal"), c["fraction"])


def _decide(s: dict, a: dict, links: list[float], tol: float) -> dict:
    cells = []
    for b in s["setup_budgets"]:
        for link in links:
            rows = [r for r in a["speed"] if r["budget"] == b and r["link"] == link and r["tok_s"]]
            ok = [r for r in rows if r["dppl_pct"] is not None and r["dppl_pct"] <= tol]
            base = next((r for r in rows if r["kind"] == "baseline"), None)
            uni = max((r for r in ok if r["kind"] == "uniform"), key=lambda r: r["tok_s"], default=None)
            mixed = max((r for r in ok if r["kind"] in ("static", "native", "dynamic")), key=lambda r: r["tok_s"],
                        default=None)
            ref = max(filter(None, (base, uni)), key=lambda r: r["tok_s"], default=None)
            worth = bool(mixed and ref and mixed["tok_s"] >= WORTH_SPEEDUP * ref["tok_s"])
            cells.append(dict(budget=b, link=link, best_mixed=mixed and mixed["config"],
                              best_mixed_speedup=mixed and mixed["speedup"], best_mixed_dppl=mixed and mixed["dppl_pct"],
                              best_uniform=uni and uni["config"], best_uniform_speedup=uni and uni["speedup"],
                              mixed_vs_best_other=mixed["tok_s"] / ref["tok_s"] if mixed and ref else None,
                              worth=worth))
    sig = a["signals"][0]["signal"] if a["signals"] else None
    beat = [p for p in s["points"] if p["kind"] in ("static", "native") and p["vs_uniform_pct"] is not None]
    uniform_wins = sum(1 for c in cells if c["best_uniform_speedup"] is not None and (
        c["best_mixed_speedup"] is None or c["best_uniform_speedup"] >= c["best_mixed_speedup"]))
    return dict(cells=cells, worth_cells=sum(c["worth"] for c in cells), total_cells=len(cells), signal=sig,
                uniform_wins=uniform_wins,
                static_points=len(beat), static_beat_uniform=sum(p["vs_uniform_pct"] < 0 for p in beat),
                tol_pct=tol, worth_speedup=WORTH_SPEEDUP)


# -- rendering: report.md and PNGs from study.json alone ---------------------------------------------------

def md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]


def config_label(p: dict) -> str:
    if p["kind"] in ("baseline", "uniform"):
        return f"{p['kind']} {p['fmt']}"
    if p["kind"] == "dynamic":
        return f"dynamic {p['high']}+{p['fmt']}"
    return f"{p['kind']} {p['high']}+{p['fmt']} {p['signal']}"


def summarize(doc: dict) -> dict:
    """The answer across the stores that hold the native 4-bit tier (int4) below a float top tier (a store whose
    top tier is int4, as a Q4 GGUF converts by default, has its own decision only: int4 is its full precision)."""
    st = [s for s in doc["stores"] if "int4" in s["precisions"] and s["high"] != "int4"]
    dec = [s["analysis"]["decision"] for s in st]
    native = [p["dppl_pct"] for s in st for p in s["points"] if p["kind"] == "native"]
    return dict(stores=len(st), cells=sum(d["total_cells"] for d in dec), worth=sum(d["worth_cells"] for d in dec),
                worth_loose=sum(s["analysis"]["decision_loose"]["worth_cells"] for s in st),
                uniform_wins=sum(d["uniform_wins"] for d in dec),
                native_min=min(native) if native else None, native_max=max(native) if native else None,
                int4_dppl=[s["analysis"]["findings"]["uniform"]["int4"]["dppl"] for s in st],
                bf16_over_int4=[s["disk_bytes"][s["high"]] / s["disk_bytes"]["int4"] for s in st], loose_pct=LOOSE_TOL_PCT,
                int2_ram_over_int4=[s["ram_bytes"]["int2"] / s["ram_bytes"]["int4"] for s in st if "int2" in s["ram_bytes"]])
