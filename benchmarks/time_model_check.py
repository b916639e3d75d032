"""How well `hobbit tune`'s time model predicts live decode: replay live runs' own traces under it.

Each live run is a `hobbit run ... --trace X.trace.gz --json X.json` pair; a case names the runs of one
setting (a glob) and its options (`Options` fields, as the runs resolved them). Each trace is replayed
under the time model a `hobbit tune --json` result holds (reads fitted to that tune's calibration
run) and the modeled decode ms per token set beside the live one. The settings' ranking is what
tune relies on, so it is printed too.

    python benchmarks/time_model_check.py --tune tune.json --cases cases.json --json results/time_model_check.json
    cases.json: {"lru": {"runs": "r*_lru.json", "options": {"policy": "lru", "high": "int4"}}, ...}
"""
from __future__ import annotations

import argparse
import glob
import json
import statistics
from pathlib import Path

from hobbit.lab.simulate import load_trace, simulate
from hobbit.lab.timeline import read_time_model
from hobbit.runtime.options import Options

def check(tune_json: Path, cases: dict) -> dict:
    model = read_time_model(tune_json)
    rows = []
    for label, case in cases.items():
        runs = sorted(glob.glob(case["runs"]))
        if not runs:
            raise SystemExit(f"case {label}: no run JSON matches {case['runs']!r}")
        opt = Options(**case["options"])
        for run in map(Path, runs):
            stats = json.loads(run.read_text())["stats"]
            header, calls = load_trace(run.with_suffix(".trace.gz"))
            r = simulate(header, calls, opt, stats["budget_bytes"], time_model=model)
            live_ms = 1e3 / stats["decode_tok_s"]
            rows.append(dict(run=str(run), case=label, live_ms_per_token=live_ms,
                         modeled_ms_per_token=r["modeled"]["decode_ms_per_token"],
                         ratio=r["modeled"]["decode_ms_per_token"] / live_ms,
                             live_bytes_read=stats["bytes_read"],
                             modeled_bytes_read=r["bytes_demand"] + r["bytes_prefetch"]))
    by_case: dict[str, dict] = {}
    for row in rows:
        c = by_case.setdefault(row["case"], {"live": [], "modeled": []})
        c["live"].append(row["live_ms_per_token"])
        c["modeled"].append(row["modeled_ms_per_token"])
    means = {c: {k: statistics.mean(v) for k, v in d.items()} for c, d in by_case.items()}
    return dict(tune=str(tune_json), time_model=model.as_dict(), cases=cases, rows=rows, mean_ms_per_token=means,
                live_order=sorted(means, key=lambda p: means[p]["live"]),
                modeled_order=sorted(means, key=lambda p: means[p]["modeled"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tune", type=Path, required=True, help="`hobbit tune --json` output holding the time model")
    ap.add_argument("--cases", type=Path, required=True, help="JSON: {label: {runs: glob of `hobbit run --json` "
                    "files, each beside its X.trace.gz, options: {Options fields}}}")
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args()
    out = check(args.tune, json.loads(args.cases.read_text()))
    for row in out["rows"]:
        print(f"{row['run']:<40} {row['case']:<14} live {row['live_ms_per_token']:7.1f} ms/token  "
              f"modeled {row['modeled_ms_per_token']:7.1f}  ({row['ratio']:.2f}x)")
    for c, m in out["mean_ms_per_token"].items():
        print(f"mean {c:<14} live {m['live']:7.1f}  modeled {m['modeled']:7.1f}")
    print("fastest first, live:   ", " < ".join(out["live_order"]))
    print("fastest first, modeled:", " < ".join(out["modeled_order"]))
    args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
