"""`hobbit study STORE [STORE...] --out docs/study/`: is mixed-precision expert caching worth it, and
is down-quantizing cold experts below their native precision?

Per store, each step's result is a JSON file under OUT/cache/<store>-<config hash>/, so a rerun
resumes where it stopped; `study.json` gathers them with every derived number (ratios, speedups,
decisions) and `report.md` + PNGs are rendered from study.json alone (study_report.py).

Steps: calibration (routing statistics on a text that is never evaluated) -> importance signals
-> full-precision baseline on two held-out texts -> static points (bottom X% of experts by a signal
re-quantized to 4/3/2 bits, a per-expert precision map run by the engine) and dynamic points
(HOBBIT's per-token rule, T1 set so X% of the calibration selections go low) -> kernel times ->
a decode trace replayed by the simulator per budget, with a time model per link.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import torch

from hobbit.lab.study_measure import (SIGNAL_DOC, SIGNALS, PerTokenPrecision, bottom, calibrate, decode_ms,
                                     kernel_times, low_share, record_decode_trace, routing_stats, run_texts,
                                     score_point, signals, simulate_config, t1_for_share)
from hobbit.policies.precision import TOLERANCE
from hobbit.runtime.options import Options
from hobbit.runtime.trace import read_trace

BITS = {4: "int4", 3: "int3", 2: "int2"}
NATIVE = {"smolmoe": "Q4_1 (SmolLM2-135M-Instruct GGUF; bf16 tier = its dequantized weights)",
          "codermoe": "Q4_K_M (Qwen2.5-Coder-1.5B-Instruct GGUF; bf16 tier = its dequantized weights)"}
# name -> (spec, split, first character): calibration and held-out texts per model
TEXTS = {"smolmoe": {"calib": ("austen:emma", "train", 0)},
         "codermoe": {"calib": ("stdlib:argparse", "all", 0)}}


def log(msg: str) -> None:
    print(f"[study {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cached(path: Path, fn):
    """fn()'s JSON result, computed once: a rerun reads it back."""
    if path.is_file():
        return json.loads(path.read_text())
    out = fn()
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(out))
    tmp.replace(path)
    return out


def model_kind(store: Path) -> str | None:
    src = Path(json.loads((store / "manifest.json").read_text())["source"]["path"]).name
    return next((k for k in NATIVE if src.startswith(k)), None)


def parse_text(spec: str) -> tuple[str, str, int]:
    """'SPEC[@split][+first]' -> (spec, split, first character)."""
    spec, _, first = spec.partition("+")
    spec, _, split = spec.partition("@")
    return spec, split or "all", int(first or 0)


def text_ids(tokenizer, text: tuple[str, str, int], n: int) -> list[int]:
    from hobbit.models.moefy_text import text_path
    spec, split, first = text
    body = text_path(spec, split).read_text(encoding="utf-8")[first:]
    chars = 8 * n
    while True:
        ids = tokenizer.encode(body[:chars])
        if len(ids) >= n or chars >= len(body):
            return ids[:n]
        chars *= 4


# -- one store -----------------------------------------------------------------------------------------

def _keys_with(fractions, lo=0, hi=100):
    return [x for x in fractions if lo < x < hi]


def study_store(store: Path, args: argparse.Namespace, out: Path) -> dict:
    """Every measurement of one store (each cached under OUT/cache/), as the `stores[i]` of study.json."""
    from hobbit.runtime.engine import load
    from hobbit.lab.simulate import load_trace
    from hobbit.models.moefy_text import EVAL_TEXTS
    from hobbit.runtime.offload import SlotPool
    from hobbit.runtime.tokenizer import Tokenizer
    from hobbit.store.config import ModelConfig
    from hobbit.store.format import ExpertStore

    kind = model_kind(store)
    evals = {n: parse_text(t) for n, t in (x.split("=", 1) for x in args.eval_text)} if args.eval_text else \
        EVAL_TEXTS.get(kind)
    calib_text = parse_text(args.calib_text) if args.calib_text else TEXTS.get(kind, {}).get("calib")
    if not evals or not calib_text:
        raise ValueError(f"{store}: not SmolMoE or CoderMoE; name the texts with --calib-text and --eval-text")
    st = ExpertStore(store)
    cfg = ModelConfig.from_dict(st.manifest["config"])
    precs = st.precisions
    high = precs[0]
    keys = sorted({f"{b.layer}/{b.expert}" for b in st.blobs.values() if b.precision == high},
                  key=lambda k: tuple(map(int, k.split("/"))))
    disk = {p: st.expert_nbytes(p) for p in precs}
    ram = {p: SlotPool(st, p, 1, torch.bfloat16).slot_bytes for p in precs}
    st.close()
    tok = Tokenizer.from_dir(store)
    setup = dict(store=store.name, texts={n: list(t) for n, t in evals.items()}, calib=list(calib_text),
                 window=args.window, windows=args.windows, calib_tokens=args.calib_tokens,
                 trace_tokens=args.trace_tokens, blobs=json.loads((store / "manifest.json").read_text())["blob_file_bytes"])
    tag = hashlib.sha256(json.dumps(setup, sort_keys=True).encode()).hexdigest()[:10]
    cdir = out / "cache" / f"{store.name}-{tag}"
    cdir.mkdir(parents=True, exist_ok=True)
    log(f"{store.name}: {kind or 'model'}, {len(keys)} experts, precisions {', '.join(precs)}; cache {cdir}")
    texts = {n: text_ids(tok, t, args.windows * args.window) for n, t in evals.items()}

    calib = cached(cdir / "calibration.json", lambda: calibrate(
        store, text_ids(tok, calib_text, args.calib_tokens), args.window, cdir / "calibration.trace.gz"))
    sig = signals(calib["stats"], keys)

    def baseline():
        eng = load(store, policy="resident", trace=cdir / "eval.trace.gz")
        res = run_texts(eng, texts, args.window)
        eng.close()
        _, calls = read_trace(cdir / "eval.trace.gz")
        return dict(texts=res, eval_stats=routing_stats(calls))
    log("baseline (full precision) on " + ", ".join(texts))
    base = cached(cdir / "baseline.json", baseline)
    eval_stats = base["eval_stats"]
    eval_sel = {k: eval_stats["experts"].get(k, {}).get("n", 0) for k in keys}
    eval_mass = {k: eval_stats["experts"].get(k, {}).get("w", 0.0) for k in keys}

    def point(name: str, low: list[str] | None, fmt: str, hi: str = high) -> dict:
        def run():
            kw = dict(high=fmt) if low is None else dict(high=hi, precision_map={
                tuple(map(int, k.split("/"))): fmt for k in low})
            eng = load(store, policy="resident", **kw)
            res = run_texts(eng, texts, args.window)
            eng.close()
            return score_point(res, base["texts"])
        t0 = time.perf_counter()
        r = cached(cdir / f"{name}.json", run)
        log(f"  {name}: " + ", ".join(f"{n} ppl {v['ppl']:.3f} top1 {v['top1']:.3f}" for n, v in r.items())
            + f" ({time.perf_counter() - t0:.0f} s)")
        return r

    fmts = [BITS[b] for b in args.bits if BITS[b] in precs and BITS[b] != high]
    points = [dict(kind="baseline", high=high, fmt=high, fraction=0, texts={
        n: dict(ppl=v["ppl"], tokens=v["tokens"], top1=1.0) for n, v in base["texts"].items()})]
    for fmt in [f for f in precs if f != high]:  # the uniform frontier: every stored tier
        points.append(dict(kind="uniform", high=fmt, fmt=fmt, fraction=100, texts=point(f"uniform-{fmt}", None, fmt)))
    grid = [(hi, fmt, s, x) for hi, fmt_list, sigs, fr in
            [(high, fmts, args.signals, args.fractions),
             *([(args.native_high, [BITS[b] for b in args.native_bits if BITS[b] in precs],
                 args.signals, args.native_fractions)] if args.native_high in precs else [])]
            for fmt in fmt_list for s in sigs for x in _keys_with(fr) if fmt != hi]
    for n, (hi, fmt, s, x) in enumerate(grid):
        low = bottom(sig[s], x / 100)
        tag_hi = "" if hi == high else f"{hi}-"
        log(f"static {n + 1}/{len(grid)}")
        points.append(dict(kind="static" if hi == high else "native", high=hi, fmt=fmt, signal=s, fraction=x,
                           low_experts=len(low), low_selection_share=sum(eval_sel[k] for k in low) / max(1, sum(eval_sel.values())),
                           low_mass_share=sum(eval_mass[k] for k in low) / max(1e-12, sum(eval_mass.values())),
                           texts=point(f"static-{tag_hi}{s}-{fmt}-{x}", low, fmt, hi)))
    _, eval_calls = read_trace(cdir / "eval.trace.gz")
    if args.dynamic:
        for fmt in fmts:
            for x in _keys_with(args.dynamic_fractions):
                t1 = t1_for_share(calib["eq2_scores"], calib["selections"], x / 100)
                name = f"dynamic-{fmt}-{x}"

                def run(fmt=fmt, t1=t1):
                    hi_eng = load(store, policy="resident")
                    lo_eng = load(store, policy="resident", high=fmt)
                    hi_eng.model.provider = PerTokenPrecision(hi_eng.provider.resident, lo_eng.provider.resident, t1)
                    res = run_texts(hi_eng, texts, args.window)
                    hi_eng.close(), lo_eng.close()
                    return score_point(res, base["texts"])
                if x / 100 > len(calib["eq2_scores"]) / max(1, calib["selections"]) + 1e-9:
                    continue  # the top-1 expert is always high: this share is out of the rule's reach
                log(f"dynamic {fmt} {x}% (T1 {t1:.4f})")
                points.append(dict(kind="dynamic", high=high, fmt=fmt, fraction=x, t1=t1,
                                   calib_low_share=low_share_calls(calib, t1), low_selection_share=low_share(eval_calls, t1),
                                   texts=cached(cdir / f"{name}.json", run)))
    log("kernel times, decode time")
    kern = cached(cdir / "kernels.json", lambda: kernel_times(store, precs))
    dec = cached(cdir / "decode.json", lambda: dict(ms_per_token=decode_ms(store)))
    trace = cdir / "decode.trace.gz"
    cached(cdir / "decode_trace.json", lambda: record_decode_trace(
        store, next(iter(texts.values()))[:args.trace_tokens], trace))
    header, calls = load_trace(trace)

    best = args.sim_signals or best_signals(points, 2)
    configs = [dict(name=f"slru {high}", kind="baseline", opt=dict(policy="slru", high=high))]
    configs += [dict(name=f"slru uniform {f}", kind="uniform", fmt=f, opt=dict(policy="slru", high=f)) for f in fmts]
    for fmt in fmts:
        for x in _keys_with(args.sim_fractions):
            t1 = t1_for_share(calib["eq2_scores"], calib["selections"], x / 100)
            if any(p["kind"] == "dynamic" and p["fmt"] == fmt and p["fraction"] == x for p in points):
                configs.append(dict(name=f"hobbit {high}+{fmt} {x}%", kind="dynamic", fmt=fmt, fraction=x,
                                    opt=dict(policy="hobbit", high=high, low=fmt, t1=t1, t2=1.0)))
    for hi, pkind in ((high, "static"), (args.native_high, "native")):
        for p in points:
            if p["kind"] == pkind and p["high"] == hi and p["signal"] in best and p["fraction"] in args.sim_fractions:
                low = bottom(sig[p["signal"]], p["fraction"] / 100)
                share = len(low) * disk[p["fmt"]] / (len(low) * disk[p["fmt"]] + (len(keys) - len(low)) * disk[hi])
                configs.append(dict(name=f"{pkind} {hi}+{p['fmt']} {p['signal']} {p['fraction']}%", kind=pkind,
                                    fmt=p["fmt"], signal=p["signal"], fraction=p["fraction"], high=hi,
                                    opt=dict(policy="slru", high=hi, low_pool_fraction=share), low=low))

    def sims():
        out = []
        for c in configs:
            for b in args.budgets:
                o = dict(c["opt"])
                if "low" in c:
                    o["precision_map"] = {tuple(map(int, k.split("/"))): c["fmt"] for k in c["low"]}
                out.append(dict(config=c["name"], budget=b, **simulate_config(header, calls, Options(**o), b)))
        return out
    log(f"simulating {len(configs)} configs x {len(args.budgets)} budgets")
    simkey = hashlib.sha256(json.dumps([c["name"] for c in configs] + list(args.budgets)).encode()).hexdigest()[:8]
    sim = cached(cdir / f"sims-{simkey}.json", sims)
    for c in configs:
        c.pop("low", None)
    man = json.loads((store / "manifest.json").read_text())
    dense = (man.get("dense_format") or {}).get("format")
    convert = f"hobbit convert {man['source']['path']} {store} --precisions {','.join(precs)}" + (
        f" --dense {dense}" if dense else "")
    shipped = man["source"].get("precision")  # a quantized source's own expert precision (hobbit convert records it)
    native = NATIVE.get(kind) or (f"{shipped} (as its {man['source']['format']} source shipped the experts)"
                                  if shipped else "unknown")
    return dict(store=store.name, path=str(store), kind=kind, convert=convert, native=native,
                arch=cfg.arch, sparse_layers=len(cfg.sparse_layers), num_experts=cfg.num_experts, top_k=cfg.top_k,
                experts=len(keys), precisions=precs, high=high, setup_budgets=list(args.budgets),
                grid=dict(fractions=args.fractions, bits=args.bits, signals=args.signals, dynamic=args.dynamic,
                          dynamic_fractions=args.dynamic_fractions, native_high=args.native_high,
                          native_bits=args.native_bits, native_fractions=args.native_fractions), disk_bytes=disk, ram_bytes=ram, setup=setup,
                calib_tokens=calib["tokens"], signals=sig, eval_stats=eval_stats, points=points,
                kernels=kern, decode_ms=dec["ms_per_token"], trace_tokens=header and len({(c.seq, c.t) for c in calls}),
                sim_configs=configs, sims=sim)


def best_signals(points: list[dict], n: int) -> list[str]:
    """The n signals whose static points raise perplexity least on average (simulated in detail)."""
    base = next(p for p in points if p["kind"] == "baseline")["texts"]
    by = {}
    for p in points:
        if p["kind"] == "static":
            by.setdefault(p["signal"], []).append(sum(v["ppl"] / base[t]["ppl"] for t, v in p["texts"].items()))
    return sorted(by, key=lambda k: sum(by[k]) / len(by[k]))[:n]


def low_share_calls(calib: dict, t1: float) -> float:
    return sum(s > t1 + TOLERANCE for s in calib["eq2_scores"]) / max(1, calib["selections"])


# -- `hobbit study` ------------------------------------------------------------------------------------

def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def _names(s: str) -> list[str]:
    out = [x.strip() for x in s.split(",") if x.strip()]
    bad = [x for x in out if x not in SIGNALS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown signal(s) {', '.join(bad)}; choose from {', '.join(SIGNALS)}")
    return out


GRID_FLAGS = (("fractions", "ints"), ("bits", "ints"), ("signals", "names"), ("dynamic_fractions", "ints"),
              ("native_high", "str"), ("native_bits", "ints"), ("native_fractions", "ints"), ("window", "int"),
              ("windows", "int"), ("calib_tokens", "int"), ("trace_tokens", "int"), ("budgets", "ints"),
              ("sim_fractions", "ints"), ("links", "floats"))


def add_study_args(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("study", help="report: is mixed-precision expert caching worth it (quality when cold "
                              "experts go to 4/3/2 bits, importance signals, resident gain, modeled decode speed)")
    p.add_argument("stores", nargs="*", help="expert stores (their tiers: `hobbit convert --precisions`); none "
                   "with --render-only")
    p.add_argument("--out", default="docs/study", help="report folder; its cache/ holds each step's result, so a "
                   "rerun resumes (default docs/study)")
    p.add_argument("--fractions", type=_ints, default=[0, 10, 25, 50, 75, 100], help="X: %% of experts sent low")
    p.add_argument("--bits", type=_ints, default=[4, 3, 2], help="low tiers (those the store holds)")
    p.add_argument("--signals", type=_names, default=["weight", "frequency", "hybrid", "confidence"],
                   help=f"importance signals ({', '.join(SIGNALS)})")
    p.add_argument("--dynamic-fractions", type=_ints, default=[10, 25, 50, 75],
                   help="dynamic points: %% of selections Eq. 2 sends low")
    p.add_argument("--no-dynamic", dest="dynamic", action="store_false", help="skip the per-token rule's points")
    p.add_argument("--native-high", default="int4", help="native tier for the below-native points (default int4)")
    p.add_argument("--native-bits", type=_ints, default=[2], help="low tiers under the native tier (default 2)")
    p.add_argument("--native-fractions", type=_ints, default=[25, 50], help="X of the below-native points")
    p.add_argument("--window", type=int, default=512, help="tokens per evaluation window (default 512)")
    p.add_argument("--windows", type=int, default=2, help="windows per held-out text (default 2)")
    p.add_argument("--calib-tokens", type=int, default=2048, help="calibration tokens (default 2048)")
    p.add_argument("--trace-tokens", type=int, default=256, help="decode-trace tokens for the simulator")
    p.add_argument("--budgets", type=_ints, default=[10, 25, 50], help="budgets, %% of top-tier expert bytes")
    p.add_argument("--sim-fractions", type=_ints, default=[25, 50], help="X of the simulated mixed configs")
    p.add_argument("--sim-signals", type=_names, default=None, help="signals of the simulated static configs "
                   "(default: the two whose static points lose least)")
    p.add_argument("--links", type=_floats, default=[0.5, 3.0, 7.0, 25.0],
                   help="GB/s: SATA-class, NVMe gen3, NVMe gen4, PCIe 4 x16 (default 0.5,3,7,25)")
    p.add_argument("--calib-text", default=None, help="SPEC[@split][+first char] (default per model)")
    p.add_argument("--eval-text", action="append", default=None, metavar="NAME=SPEC[@split][+first]",
                   help="held-out text (twice; default per model)")
    p.add_argument("--render-only", action="store_true", help="re-render report.md and plots from study.json")
    p.set_defaults(func=cmd_study)
    return p


def command_line(store: str, args: argparse.Namespace) -> str:
    def show(v):
        return ",".join(f"{x:g}" if isinstance(x, float) else str(x) for x in v) if isinstance(v, list) else str(v)
    parts = ["hobbit study", store, "--out", str(args.out)]
    parts += [f"--{k.replace('_', '-')} {show(getattr(args, k))}" for k, _ in GRID_FLAGS]
    if not args.dynamic:
        parts.append("--no-dynamic")
    if args.sim_signals:
        parts.append(f"--sim-signals {show(args.sim_signals)}")
    parts += [f"--calib-text {args.calib_text}"] if args.calib_text else []
    parts += [f"--eval-text {t}" for t in args.eval_text or []]
    return " ".join(parts)


def cmd_study(args: argparse.Namespace) -> int:
    import os
    from hobbit.lab.study_analysis import derive, summarize
    from hobbit.lab.study_report import render
    if not args.stores and not args.render_only:
        raise ValueError("name at least one store (or --render-only to re-render OUT/study.json)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / ".gitignore").write_text("cache/\n")
    path = out / "study.json"
    fresh = []
    if not args.render_only:
        torch.set_num_threads(1)
        for st in args.stores:
            fresh.append(dict(study_store(Path(st), args, out), command=command_line(st, args)))
    doc = json.loads(path.read_text()) if path.is_file() else {}  # read late: another run may have added a store
    stores = {s["store"]: s for s in doc.get("stores", [])}
    stores.update({s["store"]: s for s in fresh})
    links = doc.get("links", args.links) if args.render_only else args.links
    for s in stores.values():
        derive(s, links)
    doc = dict(machine=doc.get("machine") or f"{os.cpu_count()} CPU cores shared with other jobs, torch "
               f"{torch.__version__}, 1 torch thread", links=links, signal_doc=SIGNAL_DOC,
               commands=[s["command"] for s in stores.values()], stores=list(stores.values()))
    doc["summary"] = summarize(doc)
    path.write_text(json.dumps(doc, indent=1))
    render(doc, out)
    log(f"wrote {out / 'report.md'}, {path}")
    return 0
