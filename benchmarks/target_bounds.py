"""What the peer benchmark's byte and speed targets would take on one store and budget: oracle bounds.

The targets (CoderMoE, 25% budget): `hobbit` reads no more expert bytes per token than Belady's policy at
full precision, and decodes at least 3x `ondemand`. This measures how far any policy could go:

1. a decode trace of the peer benchmark's prompt (`hobbit run --trace`; the routing of every policy that
   loads no low copy);
2. replays at the budget: Belady at --high (the fewest bytes any cache reads at one precision), ondemand
   and lru, and hobbit at each (t1, t2) of --pairs, prefetching (as it runs) and not (its fewest bytes);
3. each pair's perplexity cost with `hobbit tune`'s probe (`RuleQuality`: Eq. 2 per token, both tiers
   resident) on calibration tokens after the first 256;
4. the speed bound: an oracle reading exactly Belady's bytes at the fastest rate any hobbit row of the
   peer run read at that limit, its compute (the unlimited resident row's time per token) fully
   overlapped, against that run's ondemand.

    python benchmarks/target_bounds.py --store $S --budget 185769536 --high int4 --low int2 \\
        --hobbit-args '--dense int4 --lm-head int8' --peer results/peer_memory.json --json results/target_bounds.json
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import tempfile
from pathlib import Path

from peer_common import HOBBIT
from peer_memory import PROMPT

from hobbit.lab.calibration import quality_probe
from hobbit.lab.simulate import load_trace, resolve_for, simulate
from hobbit.runtime.config import RunConfig

MIB = 2 ** 20


def decode_mib_per_token(report: dict) -> tuple[float, float]:
    """(demand, prefetch) expert MiB read per decoded token in a replay's decode phase."""
    d = report["phases"]["decode"]
    return d["bytes_demand"] / d["tokens"] / MIB, d["bytes_prefetch"] / d["tokens"] / MIB


def replay(header: dict, calls, budget: int, **knobs) -> dict:
    opt = resolve_for(header, RunConfig(budget=budget, **knobs)).options
    demand, prefetch = decode_mib_per_token(simulate(header, calls, opt, budget))
    return dict(knobs, demand_mib=demand, prefetch_mib=prefetch, total_mib=demand + prefetch)


def pair_quality(store: Path, pairs: list[tuple[float, float]], high: str, low: str, text: Path | None, tokens: int,
                 max_dppl: float, engine_knobs: dict) -> dict[tuple[float, float], float]:
    """Each pair's perplexity cost (%), measured as `hobbit tune` does (its calibration text after the trace's 256
    tokens, windows of 128)."""
    probe, info = quality_probe(store, text, 256, tokens, 128, high, low, max_dppl, None, engine_knobs)
    if probe is None:
        raise SystemExit(f"cannot measure the pairs' quality: {info['note']}")
    try:
        return {p: probe(*p) for p in pairs}
    finally:
        probe.close()


def peer_figures(peer: dict, limit: str) -> dict:
    """The ondemand row, the fastest hobbit read rate (MiB/s) at `limit`, and resident compute ms per token."""
    rows = {(r["row"], r["limit"]): r for r in peer["summary"]}
    ours = [r for (name, lim), r in rows.items() if lim == limit and not name.startswith("llama.cpp")]
    rate = max(r["read_per_token"] * r["best_tok_s"] for r in ours) / MIB
    return dict(limit=limit, ondemand_tok_s=rows[("ondemand", limit)]["best_tok_s"],
                ondemand_read_mib=rows[("ondemand", limit)]["read_per_token"] / MIB, peak_read_mib_s=rate,
                compute_ms=1e3 / rows[("resident", "unlimited")]["best_tok_s"])


def bounds(args: argparse.Namespace) -> dict:
    extra = shlex.split(args.hobbit_args)
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "decode.trace.gz"
        subprocess.run([*HOBBIT, "run", str(args.store), "--policy", "resident",
                        "--high", args.high, "--prompt", PROMPT, "--max-new-tokens", str(args.tokens),
                        "--trace", str(trace), *extra], check=True, stdout=subprocess.DEVNULL)
        header, calls = load_trace(trace)
    b = args.budget
    base = dict(belady=replay(header, calls, b, policy="belady", high=args.high),
                ondemand=replay(header, calls, b, policy="ondemand", high=args.high),
                lru=replay(header, calls, b, policy="lru", high=args.high))
    if base["belady"]["total_mib"] == 0:
        raise SystemExit(f"budget {b} holds every expert the trace decodes with: no reads to bound; give a smaller one")
    pairs = [tuple(float(x) for x in p.split(":")) for p in args.pairs.split(",")]
    print(f"quality of {len(pairs)} threshold pairs on {args.quality_tokens} calibration tokens ...", flush=True)
    knobs = {k.replace("-", "_").lstrip("_"): v for k, v in zip(extra[::2], extra[1::2])}
    dppl = pair_quality(args.store, pairs, args.high, args.low, args.text, args.quality_tokens, args.max_dppl, knobs)
    rows = []
    for t1, t2 in pairs:
        for depth in (None, 0):  # as it runs; no prefetch (its fewest bytes)
            r = replay(header, calls, b, policy="hobbit", high=args.high, low=args.low, t1=t1, t2=t2,
                       prefetch_depth=depth)
            rows.append(dict(r, dppl_pct=dppl[(t1, t2)]))
    feasible = [r for r in rows if r["dppl_pct"] <= args.max_dppl]
    fewest = min(feasible, key=lambda r: r["total_mib"]) if feasible else None
    peer = peer_figures(json.loads(args.peer.read_text()), args.limit)
    belady = base["belady"]["total_mib"]
    oracle_ms = max(1e3 * belady / peer["peak_read_mib_s"], peer["compute_ms"])
    return dict(store=str(args.store), budget_bytes=b, high=args.high, low=args.low, tokens=args.tokens,
                max_dppl=args.max_dppl, baselines=base, hobbit=rows, fewest_within_quality=fewest,
                fewest_over_belady=fewest["total_mib"] / belady if fewest else None, peer=peer,
                oracle_ms_per_token=oracle_ms, oracle_vs_ondemand=1e3 / oracle_ms / peer["ondemand_tok_s"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("--budget", type=int, required=True, help="expert cache bytes (the peer run's hobbit --budget)")
    ap.add_argument("--high", default="int4")
    ap.add_argument("--low", default="int2")
    ap.add_argument("--pairs", default="1:1,0.9:1,0.8:0.9,0.7:0.95,0.6:0.9,0:1", help="t1:t2 pairs for hobbit")
    ap.add_argument("--tokens", type=int, default=48, help="decode steps traced (the peer run's --tokens)")
    ap.add_argument("--quality-tokens", type=int, default=1024)
    ap.add_argument("--text", type=Path, default=None, help="calibration text (default: tune's)")
    ap.add_argument("--max-dppl", type=float, default=1.0, help="perplexity limit (%%), as the target's")
    ap.add_argument("--hobbit-args", default="", help="flags as the peer run gave hobbit, e.g. '--dense int4'")
    ap.add_argument("--peer", type=Path, required=True, help="the peer benchmark's JSON (peer_memory.py)")
    ap.add_argument("--limit", default="25%")
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args()
    out = bounds(args)
    belady = out["baselines"]["belady"]["total_mib"]
    print(f"expert MiB read per decoded token at budget {args.budget} ({args.high} high, {args.low} low):")
    for name, r in out["baselines"].items():
        print(f"  {name:<34} {r['total_mib']:7.1f}  ({r['total_mib'] / belady:.2f}x belady)")
    for r in out["hobbit"]:
        label = f"hobbit t1 {r['t1']} t2 {r['t2']}" + (" no prefetch" if r["prefetch_depth"] == 0 else "")
        print(f"  {label:<34} {r['total_mib']:7.1f}  ({r['total_mib'] / belady:.2f}x belady)  "
              f"dppl {r['dppl_pct']:+.2f}%")
    f, p = out["fewest_within_quality"], out["peer"]
    print(f"fewest within +{args.max_dppl}% perplexity: " + (f"{f['total_mib']:.1f} MiB = "
          f"{out['fewest_over_belady']:.2f}x belady" if f else "none"))
    print(f"oracle (belady's bytes at {p['peak_read_mib_s']:.0f} MiB/s, the peer run's fastest hobbit read rate at "
          f"{p['limit']}, compute {p['compute_ms']:.1f} ms overlapped): {out['oracle_ms_per_token']:.1f} ms/token = "
          f"{out['oracle_vs_ondemand']:.2f}x ondemand's {p['ondemand_tok_s']:.2f} tok/s")
    args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
