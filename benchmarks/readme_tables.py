"""The README's result tables, rendered from the JSON in results/ (so every figure there comes from a file).

    python benchmarks/readme_tables.py            # print every table
    python benchmarks/readme_tables.py --check    # exit 1 naming each table the README does not contain verbatim

tests/test_readme.py runs the check, so a README that drifts from results/ fails the suite.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20


def _load(name: str) -> dict:
    return json.loads((ROOT / "results" / name).read_text())


def _md(head: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows])


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def peer() -> str:
    s = _load("peer_llamacpp.json")["summary"]
    return _md(["engine (dense SmolLM2-135M, Q4_1 GGUF)", "decode tok/s (best of 3)", "× llama.cpp", "peak RSS MiB"],
               [[row, f"{x['best_tok_s']:.1f}", f"{x['vs_llama_cpp']:.2f}", f"{x['max_rss_bytes'] / MIB:.0f}"]
                for row, x in s.items()])


def fastpath() -> str:
    d = _load("fastpath_smolmoe.json")
    rows = []
    for name, tok_s in d["best_decode_tok_s"].items():
        m = d["memory"][name]
        base = "-" if m["baseline_rss_bytes"] is None else f"{m['baseline_rss_bytes'] / MIB:.0f}"
        rows.append([name, f"{tok_s:.1f}", f"{m['peak_rss_bytes'] / MIB:.0f}", base,
                     f"{(m['dense_bytes'] + m['kv_cache_bytes']) / MIB:.0f}",
                     f"{(m['budget_bytes'] if m['budget_bytes'] is not None else m['cached_expert_bytes']) / MIB:.1f}",
                     f"{m['peak_over_allowed']:+.1%}"])
    table = _md(["row", "decode tok/s", "peak RSS MiB", "baseline MiB", "dense + KV MiB", "experts MiB",
                 "peak vs baseline+dense+KV+experts"], rows)
    return table + (f"\n\nSmolMoE resident / dense SmolLM2: **{d['moe_vs_dense']:.2f}×**; "
                    f"hobbit at 25% / SmolMoE resident: **{d['hobbit_vs_resident']:.2f}×**.")


def bench(name: str = "bench_smolmoe.json") -> str:
    d = _load(name)
    rows = [[r["policy"], _pct(r["budget_fraction"]) if r["policy"] != "resident" else "all", f"{r['decode_tok_s']:.2f}",
             _pct(r["hit_rate"]), ", ".join(f"{p} {v:.0%}" for p, v in r["hit_rate_by_precision"].items()),
             f"{r['bytes_per_token'] / 1024:.0f}", _pct(r["loader_wait_frac"]), _pct(r["skipped_frac"]),
             f"{r['ppl_delta_pct']:+.2f}%", f"{r['top1_agreement']:.1%}"] for r in d["runs"]]
    table = _md(["policy", "budget", "decode tok/s", "hit rate", "hit rate by precision", "KiB read / token",
                 "loader wait", "skipped", "ppl Δ", "top-1"], rows)
    lo = d.get("load_overhead")
    if lo:
        table += (f"\n\nLoad overhead: ondemand − resident = {1e3 * (lo['ondemand_s_per_token'] - lo['resident_s_per_token']):.1f}"
                  f" ms per decode token; reading that token's {lo['bytes_per_token'] / MIB:.1f} MiB one blob at a time at "
                  f"the store's measured {lo['disk_read_gbps']:.2f} GB/s takes {1e3 * lo['raw_read_s_per_token']:.1f} ms: "
                  f"ratio **{lo['load_overhead_ratio']:.2f}**. Verifying a blob's xxh3 costs {lo['checksum_cost']:.1%} of its read.")
    return table


def profile(name: str = "bench_smolmoe.json") -> str:
    runs = [r for r in _load(name)["runs"] if r.get("profile_ms_per_token")]
    parts = list(runs[0]["profile_ms_per_token"])
    head = ["ms per decode token"] + [f"{r.get('name') or r['policy']} {_pct(r['budget_fraction']) if r['budget_fraction'] else ''}".strip()
                                      for r in runs]
    rows = [[p] + [f"{r['profile_ms_per_token'][p]:.2f}" for r in runs] for p in parts]
    rows.append(["total"] + [f"{sum(r['profile_ms_per_token'].values()):.2f}" for r in runs])
    return _md(head, rows)


def mobile(*names: str) -> str:
    """MoBiLE runs (hobbit bench with mobile policies), one block of rows per file; × lru within the file."""
    rows, docs = [], [_load(name) for name in names]
    runs = [r for d in docs for r in d["runs"]]
    cancel = any("fallback_prefetch_cancelled_frac" in r for r in runs)  # measured since then
    withheld = any("fallback_prefetch_withheld" in r for r in runs)  # --fallback-prefetch since then
    redone = any("fallback_redone" in r for r in runs)  # fallbacks redo the tokens accepted little before them
    weights = any("little_weights" in (r.get("variant") or {}) for r in runs)  # --little-weights compared
    for d in docs:
        lru = next((r["decode_tok_s"] for r in d["runs"] if r["policy"] == "lru"), None)
        for r in d["runs"]:
            little = r["fallback_rate"] is not None
            variant = r.get("variant") or {}
            gamma = variant.get("gamma", d["settings"]["engine"].get("gamma"))
            mode = variant.get("fallback_prefetch", "fit" if withheld else None)
            fb = "" if not little else f"{_pct(r['fallback_rate'])} / {_pct(r['eval_fallback_rate'])}"
            saved = r.get("fallback_bytes_saved_per_token")
            issued = (f"{r['fallback_prefetch_issued']} / {r['fallback_prefetch_withheld']}"
                      if little and withheld else "")
            per = (f"{r['fallback_redone'] / r['fallbacks']:.2f}" if r["fallbacks"] else "-") if little else ""
            rows.append([r["policy"] + (f" ({mode})" if little and mode else ""),
                         f"{0.7 if gamma is None else gamma:g}" if little else ""]
                        + ([variant.get("little_weights", "router") if little else ""] if weights else [])
                        + [f"{r['decode_tok_s']:.2f}", f"{r['decode_tok_s'] / lru:.2f}" if lru else "-", fb]
                        + ([per] if redone else [])
                        + ([issued] if withheld else [])
                        + [_pct(r["fallback_prefetch_used_frac"]) if little else ""]
                        + ([_pct(r.get("fallback_prefetch_cancelled_frac")) if little else "",
                            f"{saved / 1024:.0f}" if little and saved is not None else ""] if cancel else [])
                        + [f"{r['bytes_per_token'] / 1024:.0f}", f"{r['ppl_delta_pct']:+.2f}%",
                           f"{r['top1_agreement']:.1%}"])
    return _md(["policy", "gamma"] + (["little weights"] if weights else [])
               + ["decode tok/s", "× lru", "fallback (decode / eval)"]
               + (["accepted tokens redone / fallback"] if redone else [])
               + (["fallback reads issued / withheld"] if withheld else []) + ["fallback prefetches used"]
               + (["cancelled unread", "KiB saved / token"] if cancel else [])
               + ["KiB read / token", "ppl Δ", "top-1"], rows)


def offload() -> str:
    d = _load("offload_random_qwen3.json")
    rows = [[p, f"{x['decode_tok_s']:.1f}", f"{x['hit_rate']:.0%}", f"{x['bytes_per_token'] / MIB:.0f} MiB",
             f"{x['loader_wait_frac']:.0%}"] for p, x in d["best"].items()]
    table = _md(["policy", "decode tok/s", "expert hit rate", "read per token", "loader wait"], rows)
    lo = d.get("load_overhead")
    if lo:
        table += f"\n\nLoad overhead ratio (ondemand − resident over the raw reads): **{lo['load_overhead_ratio']:.2f}**."
    return table


def dense() -> str:
    speed, quality = _load("dense_smollm2.json"), _load("dense_quality.json")["ppl"]

    def ppl(model: str, fmt: str) -> str:
        x, ref = quality[model][fmt], quality[model]["bf16"]
        return f"{x:.2f}" if fmt == "bf16" else f"{x:.2f} ({100 * (x / ref - 1):+.1f}%)"
    rows = [[f"**{f}** (default)" if f == "auto" else f, f"{speed['best'][f'hobbit {f}']:.1f}",
             f"{speed['fastest_step_ms'][f'hobbit {f}']:.1f} ms", ppl("smollm2", f), ppl("smolmoe", f)]
            for f in ("bf16", "int8", "int4", "auto")]
    rows.append(["transformers bf16", f"{speed['best']['transformers bf16']:.1f}", "", "", ""])
    return _md(["`--dense`", "SmolLM2 tok/s", "fastest step", "SmolLM2 ppl", "SmolMoE ppl"], rows)


def int8_activations() -> str:
    """Weight-only int8 against int8 x int8 products (benchmarks/int8_activations.py): kernel time and quality."""
    d = _load("int8_activations.json")
    ways, q = ("int8pack", "int_mm", "fbgemm"), d["quality"]["ways"]
    rows = [[f"{name} {x['shape'][0]}×{x['shape'][1]}", *(f"{x[w]['ms']:.3f} ({x[w]['gb_s']:.1f})" for w in ways)]
            for name, x in d["kernel_ms_at_one_token"].items()]
    rows += [[f"KL vs fp32 products ({d['quality']['tokens']} tokens)", *(f"{q[w]['kl_vs_fp32']:.3f}" for w in ways)],
             ["greedy top-1 vs fp32 products", *(f"{q[w]['top1_vs_fp32']:.1%}" for w in ways)],
             [f"perplexity (fp32 products: {q['fp32']['ppl']:.2f})", *(f"{q[w]['ppl']:.2f}" for w in ways)]]
    return _md(["ms at one token (GB/s)", "`_weight_int8pack_mm` (hobbit)", "`_int_mm`, int8 rows",
                "fbgemm, one call per row"], rows)


def native_kernels() -> str:
    """hobbit.kernels against torch's weight-only kernels (benchmarks/native_kernels.py): time, decode, quality."""
    d = _load("native_kernels.json")
    builds, k, dec, q = d["builds"], d["kernels"], d["decode"], d["quality"]
    first = k[builds[0]]
    rows = []
    for name, x in first.items():
        if "shape" not in x:
            continue
        cells = [f"{x['torch_us']:.0f} ({x['torch_gb_s']:.1f})"]  # torch's, timed beside the first build
        for b in builds:
            y = k[b][name]
            cells.append(f"{y['native_us']:.0f} ({y['native_gb_s']:.1f}), {y['torch_us'] / y['native_us']:.2f}×")
        label = name.rsplit(' x', 1)[0]
        label = label if x["format"] in label else f"{label} {x['format']}"
        rows.append([f"{label} {x['shape'][0]}×{x['shape'][1]}", str(x["tokens"]), *cells])
    rows.append(["one int4 expert (w13, SwiGLU, w2): two native calls and torch's SwiGLU, or one fused call", "1",
                 "-", *(f"{k[b]['expert fused']['two_calls_us']:.0f} → {k[b]['expert fused']['fused_us']:.0f}"
                        for b in builds)])
    rows.append([f"`hobbit run --policy resident` decode tok/s (best of {len(dec['runs_tok_s']['torch'])})", "1",
                 f"{dec['best_tok_s']['torch']:.2f}",
                 *(f"{dec['best_tok_s'][b]:.2f}, {dec['speedup'][b]:.2f}×" for b in builds)])
    if "best_prefill_s" in dec:
        rows.append([f"`hobbit run --policy resident` prefill of a {dec['prefill_tokens']}-token prompt, s (best of "
                     f"{len(dec['runs_prefill_s']['torch'])})", str(dec["prefill_tokens"]),
                     f"{dec['best_prefill_s']['torch']:.2f}",
                     *(f"{dec['best_prefill_s'][b]:.2f}, {dec['prefill_speedup'][b]:.2f}×" for b in builds)])
    quality = "; ".join(f"{w} KL {q[w]['kl_vs_exact']:.4f}, top-1 {q[w]['top1_vs_exact']:.1%}, perplexity "
                        f"{q[w]['ppl']:.3f}" for w in ("torch", *builds))
    return _md(["µs at M tokens (GB/s)", "M", "torch's kernels", *(f"`{b}` build, × torch's" for b in builds)], rows) + (
        f"\n\nQuality, {q['tokens']} tokens of `{q['text'].rsplit('/', 1)[-1]}` decoded one at a time "
        f"(`{' '.join(q['run_args'])}`), against exact fp32 products of the same quantized weights (perplexity "
        f"{q['ppl_exact']:.3f}): {quality}; greedy agreement with torch's kernels: "
        + ", ".join(f"{b} {q[b]['top1_vs_torch']:.1%}" for b in builds) + ".")


def peer_memory(name: str = "peer_memory.json", quality: str | None = "peer_memory_quality.json",
                profile: str | None = "peer_memory_profile.json") -> str:
    """hobbit vs llama.cpp under one cgroup limit (benchmarks/peer_memory.py), with the ratios the issue targets."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from peer_memory import markdown_table
    d = _load(name)
    lims = ", ".join(f"{x['label']} = {x['limit_bytes'] / MIB:.0f} MiB (hobbit `--budget` {x['hobbit_budget_bytes'] / MIB:.0f} MiB)"
                     for x in d["limits"])
    own = ", ".join(f"{x['label']} = {x['limit_bytes'] / MIB:.0f} MiB" for x in d.get("own_limits", []))
    out = [markdown_table(d["summary"]), "",
           f"Limits: {lims}; llama.cpp only: {own or '-'}. Measured baselines: hobbit "
           f"{d['baselines']['hobbit'] / MIB:.0f} MiB, llama.cpp {d['baselines']['llama_cpp'] / MIB:.0f} MiB."]
    r = d["ratios"].get("25%")
    if r:
        def x(k: str) -> str:
            return "-" if r.get(k) is None else f"{r[k]:.2f}×"
        out.append(f"At the 25% limit, hobbit's decode tok/s is {x('hobbit_vs_llama_cpp')} llama.cpp's (target ≥ 2×), "
                   f"{x('hobbit_vs_llama_cpp_no-repack')} llama.cpp `--no-repack`'s, {x('hobbit_vs_lru')} lru's "
                   f"(target ≥ 1.5×), {x('hobbit_vs_ondemand')} ondemand's (target ≥ 3×) and "
                   f"{x('hobbit_vs_lru+prefetch')} lru+prefetch's.")
    sim = d.get("simulate")
    if sim:
        per = {p: v["per_token"]["bytes_demand"] + v["per_token"]["bytes_prefetch"] for p, v in sim.items()}
        demand = sim["hobbit"]["per_token"]["bytes_demand"]
        out.append("Expert bytes read per token, replayed on this prompt's trace at the 25% budget (`hobbit simulate`): "
                   + ", ".join(f"{p} {v / MIB:.1f} MiB" for p, v in per.items())
                   + f"; hobbit / belady = {per['hobbit'] / per['belady']:.2f} (target ≤ 1); hobbit's demand loads "
                   f"alone (the reads a token waits for; the rest are prefetches) {demand / MIB:.1f} MiB, "
                   f"{demand / per['belady']:.2f}× belady's.")
    if quality:
        qd = _load(quality)
        q = {r["policy"]: r for r in qd["runs"] if r.get("ppl") is not None}
        out.append(f"Quality against the resident model with {qd['reference']} (`hobbit bench --stepwise`, "
                   + "; ".join(f"{p}: perplexity {r['ppl']:.3f} vs {r['ppl_full_precision']:.3f} ({r['ppl_delta_pct']:+.2f}%), "
                               f"top-1 agreement {r['top1_agreement']:.1%}" for p, r in q.items()) + ").")
    if profile:
        for p, r in json.loads((ROOT / "results" / profile).read_text())["runs"].items():
            parts = sorted(r["ms_per_token"].items(), key=lambda kv: -kv[1])[:4]
            out.append(f"`hobbit profile` {p}: {r['total_ms_per_token']:.0f} ms per decode token, of which "
                       + ", ".join(f"{k} {v:.0f}" for k, v in parts) + " ms.")
    return "\n".join(out)


def study() -> str:
    """`hobbit study`'s answer per store, from docs/study/study.json (the report itself: docs/study/report.md)."""
    d = json.loads((ROOT / "docs" / "study" / "study.json").read_text())
    rows = []
    for st in d["stores"]:
        a, f = st["analysis"], st["analysis"]["findings"]
        uni = " · ".join(f"{p} {u['dppl']:+.1f}% ({u['top1']:.0%})" for p, u in f["uniform"].items())
        noise = "-" if f["int4_spread"] is None else f"{f['int4_min']:+.1f} to {f['int4_max']:+.1f}"
        below = ", ".join(f"{n['fraction']}%: {n['dppl']:+.1f}%" for n in f["native"]) or "-"
        rows.append([f"{st['store']} ({st['native'].split(' (')[0]})", uni, noise,
                     f"`{f['best_signal']}` {f['best_dppl']:+.1f}% / `{f['worst_signal']}` {f['worst_dppl']:+.1f}%",
                     below, *(f"{a[k]['worth_cells']} / {a[k]['total_cells']}" for k in ("decision", "decision_loose")),
                     f"{a['decision']['uniform_wins']} / {a['decision']['total_cells']}"])
    sm, dec = d["summary"], d["stores"][0]["analysis"]["decision"]  # the bar and speed-up every store shares
    return _md(["store (source)", "uniform low store: Δppl (top-1)", "int4 re-quantized points: Δppl spread (noise)",
                "best / worst signal: mean Δppl of its static points", "int4 + cold experts at int2 (below native): Δppl",
                f"mixed worth it (Δppl ≤ {dec['tol_pct']:g}%)", f"... (Δppl ≤ {sm['loose_pct']:g}%)",
                "a uniform store as fast as every mixed config"], rows) + (
        f"\n\nCells are budget (10/25/50%) × link ({', '.join(f'{x:g}' for x in d['links'])} GB/s); \"worth it\" = "
        f"within the perplexity bar and ≥ {dec['worth_speedup']:g}× both the full-precision SLRU and the best uniform "
        f"store. Over the {sm['stores']} stores that hold the native int4 tier: {sm['worth']} of {sm['cells']} cells.")


TABLES = {"peer": peer, "dense": dense, "fastpath": fastpath, "bench": bench, "profile": profile, "offload": offload,
          "mobile": lambda: mobile("bench_mobile.json", "bench_mobile_gamma0.json"),
          "mobile_codermoe": lambda: mobile("bench_mobile_codermoe.json"),
          "mobile_codermoe_weights": lambda: mobile("bench_mobile_codermoe_weights.json"),
          "mobile_codermoe_profile": lambda: profile("bench_mobile_codermoe.json"),
          "peer_memory": peer_memory, "peer_memory_bf16": lambda: peer_memory("peer_memory_bf16.json", "peer_memory_bf16_quality.json", None),
          "peer_memory_int8": lambda: peer_memory("peer_memory_int8.json", "peer_memory_int8_quality.json", None),
          "int8_activations": int8_activations, "study": study, "native_kernels": native_kernels}


def missing(readme: str) -> list[str]:
    """Names of the tables whose rendering is not in `readme` word for word."""
    return [name for name, render in TABLES.items() if render() not in readme]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    if args.check:
        gone = missing((ROOT / "README.md").read_text())
        for name in gone:
            print(f"README.md lacks the {name} table as results/ renders it; paste `python benchmarks/readme_tables.py`",
                  file=sys.stderr)
        return 1 if gone else 0
    for name, render in TABLES.items():
        print(f"<!-- {name} -->\n{render()}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
