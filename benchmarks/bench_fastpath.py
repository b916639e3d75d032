"""The fast-decode-path targets on SmolMoE, each engine a fresh `hobbit run` process, interleaved rounds.

    python benchmarks/bench_fastpath.py --json results/fastpath_smolmoe.json

Rows: dense SmolLM2-135M (its GGUF converted) resident; SmolMoE resident, hobbit / lru / ondemand
at a 25% budget. Every row runs the same 1-token prompt and 64 decode steps on 1 compute thread;
best of --repeats per row, every run kept in the JSON. Reported (and recomputable from the JSON):
  moe_vs_dense        SmolMoE resident tok/s / dense SmolLM2 tok/s       (target >= 1.0)
  hobbit_vs_resident  SmolMoE hobbit at 25% / SmolMoE resident            (target >= 0.8)
  memory per row      peak RSS vs baseline + dense + KV + budget (+5%), and the baseline (target <= 250 MB):
                      baseline = RSS after `import hobbit` and torch, before any weight is loaded
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROWS = {  # name: (store key, policy, budget)
    "dense smollm2": ("dense", "resident", None),
    "smolmoe resident": ("moe", "resident", None),
    "smolmoe hobbit 25%": ("moe", "hobbit", "25%"),
    "smolmoe lru 25%": ("moe", "lru", "25%"),
    "smolmoe ondemand": ("moe", "ondemand", None),
}
HOBBIT = [sys.executable, "-m", "hobbit.cli"]


def hobbit_out(*args: str) -> str:
    return subprocess.run([*HOBBIT, *args], check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]


def stores(folder: Path) -> dict[str, str]:
    """The dense SmolLM2 store (converted here once) and the SmolMoE store (the asset)."""
    dense = folder / "smollm2-store"
    manifest = dense / "manifest.json"
    if not manifest.is_file() or "dense_format" not in json.loads(manifest.read_text()):  # missing, or pre --dense
        subprocess.run([*HOBBIT, "convert", hobbit_out("assets", "smollm2-gguf"), str(dense)], check=True,
                       capture_output=True)
    return {"dense": str(dense), "moe": hobbit_out("assets", "smolmoe-store")}


def run_row(store: str, policy: str, budget: str | None, tokens: int, extra: list[str]) -> dict:
    cmd = [*HOBBIT, "run", store, "--prompt-ids", "1", "--max-new-tokens", str(tokens + 1), "--json",
           "--policy", policy, "--threads", "1", *(["--budget", budget] if budget else []), *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def memory_check(r: dict) -> dict:
    """peak RSS against what the process is allowed: baseline + dense + KV + expert budget, + 5%."""
    s = r["stats"]
    allowed = s.get("baseline_rss_bytes", 0) + s["dense_bytes"] + s["kv_cache_bytes"] + (
        s["budget_bytes"] if s["budget_bytes"] is not None else s["cached_expert_bytes"])
    return dict(peak_rss_bytes=s["peak_rss_bytes"], baseline_rss_bytes=s.get("baseline_rss_bytes"),
                dense_bytes=s["dense_bytes"], kv_cache_bytes=s["kv_cache_bytes"], budget_bytes=s["budget_bytes"],
                cached_expert_bytes=s["cached_expert_bytes"], allowed_bytes=allowed,
                peak_over_allowed=s["peak_rss_bytes"] / allowed - 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--work", default=os.path.expanduser("~/.cache/hobbit/bench"), help="where the dense store goes")
    ap.add_argument("--extra", default="", help="more `hobbit run` options for every row, e.g. '--dense bf16'")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    Path(args.work).mkdir(parents=True, exist_ok=True)
    paths, runs = stores(Path(args.work)), []
    for rnd in range(args.repeats):
        names = list(ROWS)
        names = names[rnd % len(names):] + names[:rnd % len(names)]  # rotate who goes first
        for name in names:
            key, policy, budget = ROWS[name]
            r = run_row(paths[key], policy, budget, args.tokens, args.extra.split())
            runs.append(dict(row=name, round=rnd, decode_tok_s=r["stats"]["decode_tok_s"], stats=r["stats"]))
            print(f"[{rnd + 1}/{args.repeats}] {name:<20} {r['stats']['decode_tok_s']:7.2f} tok/s", flush=True)
    best = {n: max((x for x in runs if x["row"] == n), key=lambda x: x["decode_tok_s"]) for n in ROWS}
    tok_s = {n: b["decode_tok_s"] for n, b in best.items()}
    out = dict(stores=paths, tokens=args.tokens, repeats=args.repeats, extra=args.extra,
               best_decode_tok_s=tok_s,
               moe_vs_dense=tok_s["smolmoe resident"] / tok_s["dense smollm2"],
               hobbit_vs_resident=tok_s["smolmoe hobbit 25%"] / tok_s["smolmoe resident"],
               memory={n: memory_check(b) for n, b in best.items()}, runs=runs)
    print(f"\n{'row':<20} {'tok/s':>8} {'peak MiB':>9} {'baseline MiB':>13} {'over allowed':>13}")
    for n in ROWS:
        m = out["memory"][n]
        base = "-" if m["baseline_rss_bytes"] is None else f"{m['baseline_rss_bytes'] / 2**20:.0f}"
        print(f"{n:<20} {tok_s[n]:8.2f} {m['peak_rss_bytes'] / 2**20:9.0f} {base:>13} {m['peak_over_allowed']:+13.1%}")
    print(f"SmolMoE resident / dense: {out['moe_vs_dense']:.2f}x; hobbit 25% / resident: {out['hobbit_vs_resident']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
