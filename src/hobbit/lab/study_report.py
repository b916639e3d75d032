"""`hobbit study`'s analysis and report: `derive` adds every derived number (ppl ratios, the uniform
frontier at equal bytes, the signal ranking, resident-expert gains, modeled decode speed per link,
the decision) to study.json; `render` writes report.md and the PNGs from study.json alone, so
every number in the markdown is a value of the JSON, formatted (tests check this)."""
from __future__ import annotations

from pathlib import Path

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


def _findings_md(s: dict) -> list[str]:
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
        L.append(f"- The 2-bit path: an int2 expert computes in {fmt(f['int2_vs_int4_ms'], 'sx')} the int4 time (the "
                 f"int4 kernel after expansion) and its blob is {fmt(f['int2_vs_int4_disk'], 'sx')} int4's on disk, but "
                 f"its RAM slot is {fmt(f['int2_vs_int4_ram'], 'sx')} int4's (it holds the stored and the expanded form), "
                 f"and a load (read, expansion) takes {fmt(f['int2_load_ms'], 'f3')} ms against int4's "
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

def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]


def _label(p: dict) -> str:
    if p["kind"] in ("baseline", "uniform"):
        return f"{p['kind']} {p['fmt']}"
    if p["kind"] == "dynamic":
        return f"dynamic {p['high']}+{p['fmt']}"
    return f"{p['kind']} {p['high']}+{p['fmt']} {p['signal']}"


def summarize(doc: dict) -> dict:
    """The answer across the stores that hold the native 4-bit tier (int4)."""
    st = [s for s in doc["stores"] if "int4" in s["precisions"]]
    dec = [s["analysis"]["decision"] for s in st]
    native = [p["dppl_pct"] for s in st for p in s["points"] if p["kind"] == "native"]
    return dict(stores=len(st), cells=sum(d["total_cells"] for d in dec), worth=sum(d["worth_cells"] for d in dec),
                worth_loose=sum(s["analysis"]["decision_loose"]["worth_cells"] for s in st),
                uniform_wins=sum(d["uniform_wins"] for d in dec),
                native_min=min(native) if native else None, native_max=max(native) if native else None,
                int4_dppl=[s["analysis"]["findings"]["uniform"]["int4"]["dppl"] for s in st],
                bf16_over_int4=[s["disk_bytes"][s["high"]] / s["disk_bytes"]["int4"] for s in st], loose_pct=LOOSE_TOL_PCT)


def render(doc: dict, out: Path) -> str:
    """report.md (returned and written) and the PNGs, from the study.json document."""
    L = ["# Is mixed-precision expert caching worth it?", "",
         "Generated by `hobbit study` from `study.json` (every number below is a value there); rerun with",
         "the commands in [Reproduce](#reproduce). Machine: " + doc["machine"] + ".", ""]
    L += ["## Decision", ""]
    a = doc.get("summary")
    if a and a["stores"]:
        verdict = "no, not on these models and this engine" if a["worth"] == 0 else "only in some cells"
        L += [f"**Answer: {verdict}.** Over the {fmt(a['stores'], 'i')} stores with the "
              f"native 4-bit tier, a mixed config beats both the full-precision SLRU and the best uniform store in "
              f"{fmt(a['worth'], 'i')} of {fmt(a['cells'], 'i')} budget x link cells ({fmt(a['worth_loose'], 'i')} with a "
              f"+{fmt(a['loose_pct'], 'f2')}% perplexity bar); the best uniform store is at least as fast as every mixed "
              f"config in {fmt(a['uniform_wins'], 'i')} of them; uniform int4 costs Δppl "
              + ", ".join(fmt(x, 'f2') + "%" for x in a["int4_dppl"]) + ". Both sources are 4-bit, so the bf16 tier "
              "holds the same information at " + ", ".join(fmt(x, "sx") for x in a["bf16_over_int4"]) + " the bytes, and going "
              f"below native (int4 + cold experts at int2) costs Δppl {fmt(a['native_min'], 'f2')}% to "
              f"{fmt(a['native_max'], 'f2')}% while an int2 expert takes more RAM than an int4 one here (its slot "
              "holds the expanded form). Per store:", ""]
    for s in doc["stores"]:
        d = s["analysis"]["decision"]
        L.append(f"- **{s['store']}** (native {s['native']}): mixed precision is worth it (a mixed config keeps "
                 f"perplexity within +{fmt(d['tol_pct'], 'f2')}% and decodes at least {fmt(d['worth_speedup'], 'sx')} "
                 f"faster than both the full-precision SLRU and the best uniform store that keeps quality) in "
                 f"{fmt(d['worth_cells'], 'i')} of {fmt(d['total_cells'], 'i')} budget x link cells; best signal "
                 f"`{d['signal']}`; static mixed points below the uniform frontier at equal bytes: "
                 f"{fmt(d['static_beat_uniform'], 'i')} of {fmt(d['static_points'], 'i')}; a uniform store (every "
                 f"expert at one low tier) is at least as fast as the best mixed config in "
                 f"{fmt(d['uniform_wins'], 'i')} of {fmt(d['total_cells'], 'i')} cells.")
        if "int4" not in s["precisions"]:
            L.append("  This store holds no int4 tier, so its decision ignores the uniform int4 store (the native "
                     "bit width), which beats every mixed config wherever a store has it.")
        d = s["analysis"]["decision_loose"]
        L.append(f"  With a +{fmt(d['tol_pct'], 'f2')}% perplexity bar instead: worth it in {fmt(d['worth_cells'], 'i')} "
                 f"of {fmt(d['total_cells'], 'i')} cells" + "".join(
                     f"; {fmt(c['budget'], 'i')}% at {fmt(c['link'], 'g')} GB/s: {c['best_mixed']} "
                     f"{fmt(c['mixed_vs_best_other'], 'sx')} the best alternative" for c in d["cells"] if c["worth"]) + ".")
    L.append("")
    for s in doc["stores"]:
        L += [f"### {s['store']}: best configs per budget and link", ""]
        rows = [[fmt(c["budget"], "i") + "%", fmt(c["link"], "g") + " GB/s", c["best_mixed"] or "–",
                 fmt(c["best_mixed_speedup"], "sx"), fmt(c["best_mixed_dppl"], "f2"), c["best_uniform"] or "–",
                 fmt(c["best_uniform_speedup"], "sx"), fmt(c["mixed_vs_best_other"], "sx"), "yes" if c["worth"] else "no"]
                for c in s["analysis"]["decision"]["cells"]]
        L += _table(["budget", "link", "best mixed (Δppl ≤ tol)", "vs SLRU", "Δppl %", "best uniform",
                     "vs SLRU", "mixed vs best other", "worth it"], rows) + [""]
    L += ["## Setup", ""]
    for s in doc["stores"]:
        L.append(f"- **{s['store']}** ({s['arch']}, {fmt(s['sparse_layers'], 'i')} MoE layers x "
                 f"{fmt(s['num_experts'], 'i')} experts, top-{fmt(s['top_k'], 'i')}; native {s['native']}). Tiers and "
                 "blob bytes per expert: " + ", ".join(f"{p} {fmt(s['disk_bytes'][p], 'i')}" for p in s["precisions"])
                 + f". Calibration: `{s['setup']['calib'][0]}` ({s['setup']['calib'][1]}), "
                 f"{fmt(s['calib_tokens'], 'i')} tokens; held-out: " + ", ".join(
                     f"`{v[0]}` ({v[1]}) from char {fmt(v[2], 'i')}" for v in s["setup"]["texts"].values())
                 + f", {fmt(s['setup']['windows'], 'i')} x {fmt(s['setup']['window'], 'i')} tokens each.")
    L += ["", "Signals (higher = more important; the bottom X% of all experts by it go low):", ""]
    L += [f"- `{k}`: {v}" for k, v in doc["signal_doc"].items()]
    L += ["", "Static = a fixed per-expert precision map (`Options.precision_map`, run by the engine); dynamic = "
          "HOBBIT's per-token Eq. 2 rule with T2 = 1 and T1 set so X% of the calibration selections go low (the top-1 "
          "expert is always high, so X ≤ (k-1)/k), computed with no cache in the way (a live cache may serve a high "
          "copy instead, so this bounds its loss). Native = the same static maps over the native 4-bit tier. Δppl = "
          "mean over the two texts of ppl / full-precision ppl - 1; top-1 = greedy next-token agreement with full "
          "precision; bytes = expert-store bytes per expert (dynamic: per selection, from its low share on the "
          "held-out texts); vs uniform = Δppl minus the uniform stores' Δppl interpolated at the same bytes "
          "(negative: the mix beats a uniform store of the same size).", ""]
    for s in doc["stores"]:
        L += _findings_md(s) + _quality(s, out) + _signals(s) + _gain_md(s) + _speed_md(s, doc["links"], out) + _kernels_md(s)
    L += ["## Reproduce", "", "The stores (each `hobbit convert` once; SmolMoE and CoderMoE are `hobbit assets smolmoe` / "
          "`codermoe`), then the study, one command per store (a rerun resumes from `cache/`; `hobbit study --out "
          "docs/study --render-only` re-renders this file and the plots from study.json):", ""]
    L += [f"    {s['convert']}" for s in doc["stores"] if s.get("convert")] + [""] + [f"    {c}" for c in doc["commands"]] + [""]
    text = "\n".join(L)
    (out / "report.md").write_text(text)
    return text


def _quality(s: dict, out: Path) -> list[str]:
    L = [f"## {s['store']}: quality", "", f"![quality]({_plot_quality(s, out)}) ![frontier]({_plot_frontier(s, out)})", ""]
    texts = list(s["points"][0]["texts"])
    head = ["config", "X %", *[f"ppl {t}" for t in texts], "Δppl %", "top-1", "bytes/expert", "vs uniform"]
    rows = []
    for p in s["points"]:
        rows.append([_label(p), fmt(p["fraction"], "i"), *[fmt(p["texts"][t]["ppl"], "f3") for t in texts],
                     fmt(p["dppl_pct"], "f2"), fmt(p["top1"], "pct"), fmt(p["bytes_per_expert"], "i"),
                     fmt(p["vs_uniform_pct"], "f2")])
    return L + _table(head, rows) + [""]


def _signals(s: dict) -> list[str]:
    L = [f"## {s['store']}: which importance signal", "",
         "Ranked by the mean Δppl over all static points of the signal (lower is better). Low mass = share of the "
         "held-out texts' routing mass on the experts the signal sends low at X = 25% / 50% (lower is better); "
         "stability = Spearman correlation of the signal on the calibration text and on the held-out texts.", ""]
    fmts = sorted({f for r in s["analysis"]["signals"] for f in r["by_fmt"]})
    rows = [[fmt(r["rank"], "i"), r["signal"], fmt(r["mean_dppl_pct"], "f2"), *[fmt(r["by_fmt"].get(f), "f2") for f in fmts],
             fmt(r["mean_top1"], "pct"), fmt(r["low_mass_25"], "pct"), fmt(r["low_mass_50"], "pct"), fmt(r["stability"], "f3")]
            for r in s["analysis"]["signals"]]
    return L + _table(["rank", "signal", "mean Δppl %", *[f"Δppl % {f}" for f in fmts], "mean top-1",
                       "low mass 25%", "low mass 50%", "stability"], rows) + [""]


def _gain_md(s: dict) -> list[str]:
    L = [f"## {s['store']}: resident experts per budget", "",
         "Experts a budget (% of all expert bytes at the top tier) holds at each tier (RAM slot bytes, of "
         f"{fmt(s['experts'], 'i')}), and the gain over the top tier.", ""]
    precs = s["precisions"]
    rows = [[fmt(g["budget"], "i") + "%", fmt(g["budget_bytes"], "i"),
             *[f"{fmt(g['held'][p], 'i')} ({fmt(g['gain'][p], 'sx')})" for p in precs]] for g in s["analysis"]["gain"]]
    return L + _table(["budget", "bytes", *precs], rows) + [""]


def _speed_md(s: dict, links: list[float], out: Path) -> list[str]:
    L = [f"## {s['store']}: modeled decode speed", "",
         f"![speed]({_plot_speed(s, links, out)})", "",
         f"A {fmt(s['trace_tokens'], 'i')}-token teacher-forced decode trace replayed by `hobbit simulate` per config "
         "and budget; tok/s = 1 / (compute + demand reads / link + prefetch reads beyond the compute / link), compute = "
         f"the measured resident decode ({fmt(s['decode_ms'], 'f2')} ms/token: {fmt(s['analysis']['rest_ms'], 'f2')} ms "
         f"outside the routed experts + {fmt(s['analysis']['expert_ms_per_token'], 'f2')} ms of top-tier experts) with "
         "each selection at its tier's measured expert time. Speedup vs `slru` at full precision, same budget and link.", ""]
    budgets = s["setup_budgets"]
    for link in links:
        rows = []
        for c in s["sim_configs"]:
            rs = {r["budget"]: r for r in s["analysis"]["speed"] if r["link"] == link and r["config"] == c["name"]}
            first = next(iter(rs.values()))
            rows.append([c["name"], fmt(first["dppl_pct"], "f2"), *[
                f"{fmt(rs[b]['tok_s'], 'f2')} ({fmt(rs[b]['speedup'], 'sx')}, hits {fmt(rs[b].get('hit_rate'), 'pct')})"
                if rs[b]["tok_s"] else "too small" for b in budgets]])
        L += [f"Link {fmt(link, 'g')} GB/s: tok/s (speedup, expert hit rate) per budget", ""]
        L += _table(["config", "Δppl %", *[f"{fmt(b, 'i')}%" for b in budgets]], rows) + [""]
    return L


def _kernels_md(s: dict) -> list[str]:
    L = [f"## {s['store']}: expert kernel time at one token", "",
         "One expert FFN (gate/up, activation, down) at one bf16 token (fastest of 30 rounds, tiers interleaved); load = read + prepare "
         "one blob into a slot (page cache warm, checksum verified on an earlier read; fastest of 30). int3/int2 run through the int4 kernel after a bit expansion at load, so their differences to int4 "
         "are noise: timings on this shared machine move between runs.", ""]
    rows = [[p, fmt(v["expert_ms"], "f4"), fmt(v["vs_high"], "sx"), fmt(v["vs_int4"], "sx"), fmt(v["load_ms"], "f3"),
             fmt(v["disk_bytes"], "i"), fmt(v["slot_bytes"], "i")] for p, v in s["analysis"]["kernels"].items()]
    return L + _table(["tier", "expert ms", "vs top tier", "vs int4", "load ms", "blob bytes", "RAM slot bytes"], rows) + [""]


# -- plots ---------------------------------------------------------------------------------------------------

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _plot_quality(s: dict, out: Path) -> str:
    plt = _plt()
    fmts = sorted({p["fmt"] for p in s["points"] if p["kind"] in ("static", "dynamic")}, reverse=True)
    fig, axes = plt.subplots(1, max(1, len(fmts)), figsize=(4.2 * max(1, len(fmts)), 3.4), squeeze=False)
    base = next(p for p in s["points"] if p["kind"] == "baseline")
    for ax, f in zip(axes[0], fmts):
        uni = next((p for p in s["points"] if p["kind"] == "uniform" and p["fmt"] == f), None)
        for sig in sorted({p.get("signal") for p in s["points"] if p["kind"] == "static"}):
            pts = [base] + [p for p in s["points"] if p["kind"] == "static" and p["fmt"] == f and p["signal"] == sig] + [uni]
            pts = [p for p in pts if p]
            ax.plot([p["fraction"] for p in pts], [p["dppl_pct"] for p in pts], marker="o", label=sig)
        dyn = [base] + [p for p in s["points"] if p["kind"] == "dynamic" and p["fmt"] == f]
        if len(dyn) > 1:
            ax.plot([p["fraction"] for p in dyn], [p["dppl_pct"] for p in dyn], "k--", marker="s", label="dynamic (Eq. 2)")
        ax.set_title(f"{s['store'][:24]}: bottom X% -> {f}", fontsize=8)
        ax.set_xlabel("X: % of experts (dynamic: of selections) at low")
        ax.set_ylabel("Δppl % (mean of 2 texts)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    name = f"quality_{s['store']}.png"
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def _plot_frontier(s: dict, out: Path) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    uni = sorted((p for p in s["points"] if p["kind"] in ("baseline", "uniform")), key=lambda p: p["bytes_share"])
    ax.plot([p["bytes_share"] for p in uni], [p["dppl_pct"] for p in uni], "k-", marker="D", label="uniform stores")
    for p in uni:
        ax.annotate(p["fmt"], (p["bytes_share"], p["dppl_pct"]), fontsize=7)
    groups = {}
    for p in s["points"]:
        if p["kind"] in ("static", "native", "dynamic"):
            groups.setdefault(f"{p['kind']} {p.get('signal') or ''}".strip(), []).append(p)
    for g, pts in sorted(groups.items()):
        ax.scatter([p["bytes_share"] for p in pts], [p["dppl_pct"] for p in pts], s=14, label=g)
    ax.set_xlabel("expert bytes / top-tier bytes")
    ax.set_ylabel("Δppl %")
    ax.set_yscale("symlog", linthresh=1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    ax.set_title(f"{s['store'][:30]}: quality vs bytes", fontsize=8)
    name = f"frontier_{s['store']}.png"
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def _plot_speed(s: dict, links: list[float], out: Path) -> str:
    plt = _plt()
    fig, axes = plt.subplots(1, len(links), figsize=(3.4 * len(links), 3.2), squeeze=False, sharey=True)
    cells = {(c["budget"], c["link"]): c for c in s["analysis"]["decision"]["cells"]}
    for ax, link in zip(axes[0], links):
        rows = [r for r in s["analysis"]["speed"] if r["link"] == link]
        for name, pick in (("slru full precision", lambda r: r["kind"] == "baseline"),
                           ("best uniform (Δppl ≤ tol)", lambda r: r["config"] == cells[(r["budget"], link)]["best_uniform"]),
                           ("best mixed (Δppl ≤ tol)", lambda r: r["config"] == cells[(r["budget"], link)]["best_mixed"])):
            pts = sorted((r["budget"], r["tok_s"]) for r in rows if pick(r) and r["tok_s"])
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        ax.set_title(f"{link:g} GB/s", fontsize=8)
        ax.set_xlabel("budget % of expert bytes")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("modeled decode tok/s")
    axes[0][0].legend(fontsize=6)
    name = f"speed_{s['store']}.png"
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name
