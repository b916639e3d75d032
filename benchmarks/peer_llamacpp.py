"""llama.cpp peer harness: `llama-bench` beside hobbit on the same GGUF (benchmark only, never a runtime dependency).

    python benchmarks/peer_llamacpp.py --asset smollm2-gguf --repeats 3 --tokens 64 --json results/peer_llamacpp.json

llama.cpp's tools are built once from the llama-cpp-python sdist's `vendor/llama.cpp` (GGML_NATIVE=ON,
~4-6 min on 2 cores) and cached under $HOBBIT_CACHE/peers/. Every measurement is a fresh process, and the
rows are interleaved (llama.cpp, hobbit-int4, hobbit-bf16, llama.cpp, ...) so machine noise hits all rows
alike; each row reports its best run, every run is kept in the JSON.

Fairness: `llama-bench -p 0 -n N` times N single-token forward passes from an empty context (after one
untimed warm-up run inside the process). hobbit gets a 1-token prompt and `--max-new-tokens N+1`: its first
token comes from the prefill logits, so its decode_tok_s also times exactly N single-token forward passes,
at positions 1..N. hobbit has no warm-up, so its one-off first-call costs are inside its figure. Both run
on 1 thread (`-t 1`; `--threads 1` with OMP_NUM_THREADS=1). llama.cpp computes on the GGUF's Q4_1 blocks;
hobbit dequantizes the GGUF at convert time and keeps its dense weights as int4 (same bytes as Q4_1, its
own groups) or bf16.

Building llama.cpp and `run_measured` (a command measured, optionally under a cgroup memory limit) live in
peer_common.py, shared with peer_memory.py.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer_common import (HOBBIT, LLAMA_CPP_PYTHON, TARGETS, _own_cgroup, _step, build_llamacpp,  # noqa: E402,F401
                         hobbit_has_option, machine_info, make_memory_cgroup, parse_size, peers_dir,
                         run_measured)

LLAMA_ROW = "llama.cpp"
HOBBIT_DENSE = ("auto", "bf16", "fp32", "int8", "int4")  # hobbit-<dense> rows


# ---------------------------------------------------------------- the two engines

def parse_llama_bench(stdout: str) -> dict:
    """The tg test of `llama-bench -o json` output: tok/s plus the build and model facts worth keeping."""
    tests = json.loads(stdout[stdout.index("["):])  # skip anything printed before the JSON array
    tg = [t for t in tests if t.get("n_gen", 0) > 0]
    if not tg:
        raise ValueError("llama-bench output has no text-generation test (n_gen > 0)")
    t = tg[0]
    keep = ("build_commit", "build_number", "cpu_info", "backends", "model_type", "model_size", "n_threads",
            "load_mode", "repack", "n_prompt", "n_gen", "n_depth", "avg_ts", "samples_ts")
    return dict(tok_s=float(t["avg_ts"]), **{k: t[k] for k in keep if k in t})


def llama_bench_cmd(bindir: Path, gguf: Path, tokens: int, threads: int, extra: list[str]) -> list[str]:
    # -r 1: one timed repetition per process; the harness repeats across fresh processes, interleaved
    return [str(bindir / "llama-bench"), "-m", str(gguf), "-t", str(threads), "-p", "0", "-n", str(tokens),
            "-r", "1", "-o", "json", *extra]


@dataclass
class HobbitCLI:
    """How this version of hobbit takes --dense: at convert time, at run time, or both."""
    convert_dense: bool
    run_dense: bool

    @classmethod
    def detect(cls) -> "HobbitCLI":
        return cls(hobbit_has_option("convert", "--dense"), hobbit_has_option("run", "--dense"))

    def convert_cmd(self, gguf: Path, store: Path, dense: str) -> list[str]:
        return [*HOBBIT, "convert", str(gguf), str(store), *(["--dense", dense] if self.convert_dense else [])]

    def run_cmd(self, store: Path, dense: str, tokens: int, threads: int) -> list[str]:
        # 1-token prompt and tokens+1 new tokens: the first comes from prefill, so decode times `tokens` steps
        return [*HOBBIT, "run", str(store), "--prompt-ids", "1", "--max-new-tokens", str(tokens + 1), "--json",
                "--policy", "resident", "--threads", str(threads), *(["--dense", dense] if self.run_dense else [])]


def parse_hobbit(stdout: str) -> dict:
    """decode tok/s and friends from `hobbit run --json` (one JSON object; stats nested or flat)."""
    line = next((ln for ln in reversed(stdout.splitlines()) if ln.startswith("{")), None)
    if line is None:
        raise ValueError("`hobbit run --json` printed no JSON object")
    obj = json.loads(line)
    s = obj.get("stats", obj)
    keep = ("decode_tok_s", "prefill_s", "decode_s", "generated_tokens", "dense_bytes", "peak_rss_bytes")
    return dict(tok_s=float(s["decode_tok_s"]), finish_reason=obj.get("finish_reason"),
                **{k: s[k] for k in keep if k in s})


# ---------------------------------------------------------------- summary

def summarize(runs: list[dict], rows: list[str]) -> dict[str, dict]:
    """Per row: best tok/s, every run's tok/s, max peak RSS, and best / best llama.cpp."""
    out: dict[str, dict] = {}
    for row in rows:
        ok = [r for r in runs if r["row"] == row and r.get("tok_s") is not None]
        vals = [r["tok_s"] for r in ok]
        out[row] = dict(best_tok_s=max(vals) if vals else None, tok_s=vals,
                        failed=sum(1 for r in runs if r["row"] == row and r.get("tok_s") is None),
                        max_rss_bytes=max((r["max_rss_bytes"] for r in ok), default=None))
    base = out.get(LLAMA_ROW, {}).get("best_tok_s")
    for s in out.values():
        s["vs_llama_cpp"] = s["best_tok_s"] / base if base and s["best_tok_s"] is not None else None
    return out


def markdown_table(summary: dict[str, dict], tokens: int) -> str:
    lines = [f"| row | tg{tokens} tok/s (best) | all runs | peak RSS MiB | x llama.cpp |", "|---|---|---|---|---|"]
    for row, s in summary.items():
        best = f"{s['best_tok_s']:.1f}" if s["best_tok_s"] is not None else "failed"
        runs = ", ".join([f"{v:.1f}" for v in s["tok_s"]] + ([f"{s['failed']} failed"] if s["failed"] else []))
        rss = f"{s['max_rss_bytes'] / 2**20:.0f}" if s["max_rss_bytes"] else "-"
        ratio = f"{s['vs_llama_cpp']:.2f}" if s["vs_llama_cpp"] is not None else "-"
        lines.append(f"| {row} | {best} | {runs} | {rss} | {ratio} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--gguf", type=Path, help="GGUF file both engines read")
    src.add_argument("--asset", default="smollm2-gguf", help="hobbit asset naming the GGUF (default smollm2-gguf)")
    ap.add_argument("--rows", default=f"{LLAMA_ROW},hobbit-auto,hobbit-int4,hobbit-bf16",
                    help=f"comma list of {LLAMA_ROW} and hobbit-<{'|'.join(HOBBIT_DENSE)}> (run in this order, interleaved)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds over all rows; each row reports its best")
    ap.add_argument("--tokens", type=int, default=64, help="generated tokens timed per run (llama-bench -n)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None, help="write every run and the summary here")
    ap.add_argument("--jobs", type=int, default=2, help="parallel jobs for the one-time llama.cpp build")
    ap.add_argument("--llama-args", default="", help="extra llama-bench arguments, e.g. '-lm none' (no mmap)")
    ap.add_argument("--limit", default=None, help="run every command in a memory cgroup capped here, e.g. 2GiB (root)")
    ap.add_argument("--drop-caches", action="store_true", help="drop the page cache before every run (root)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds before a run is killed")
    args = ap.parse_args(argv)
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    bad = [r for r in args.rows if r != LLAMA_ROW and r.removeprefix("hobbit-") not in HOBBIT_DENSE]
    if bad or not args.rows:
        ap.error(f"unknown rows {bad}; use {LLAMA_ROW} and hobbit-<{'|'.join(HOBBIT_DENSE)}>")
    if args.repeats < 1 or args.tokens < 1:
        ap.error("--repeats and --tokens must be >= 1")
    try:
        args.limit_bytes = parse_size(args.limit) if args.limit else None
    except ValueError as e:
        ap.error(f"--limit: {e}")
    return args


def resolve_gguf(args: argparse.Namespace) -> Path:
    if args.gguf:
        if not args.gguf.is_file():
            raise SystemExit(f"error: GGUF {args.gguf} does not exist; pass a file or --asset smollm2-gguf")
        return args.gguf.resolve()
    r = subprocess.run([*HOBBIT, "assets", args.asset], stdout=subprocess.PIPE, text=True)
    if r.returncode != 0:
        raise SystemExit(f"error: `hobbit assets {args.asset}` failed (exit {r.returncode}); see its output above")
    return Path(r.stdout.strip().splitlines()[-1])


def convert_stores(cli: HobbitCLI, gguf: Path, rows: list[str], folder: Path, env: dict) -> dict[str, Path]:
    """hobbit stores per row: one per dense precision if convert takes --dense, else one serving every row."""
    stores: dict[str, Path] = {}
    for row in rows:
        if row == LLAMA_ROW:
            continue
        dense = row.removeprefix("hobbit-")
        store = folder / f"store-{dense if cli.convert_dense else 'any'}"
        if store not in stores.values():
            _step(f"converting {gguf.name} for hobbit ({'--dense ' + dense if cli.convert_dense else 'dense at run time'})")
            subprocess.run(cli.convert_cmd(gguf, store, dense), check=True, env=env, stdout=subprocess.DEVNULL)
        stores[row] = store
    return stores


def measure_row(row: str, rnd: int, cmd: list[str], parse, **measure) -> dict:
    """One fresh-process run of a row: the parsed figures plus everything run_measured saw."""
    load1 = os.getloadavg()[0]  # a busy machine explains a slow run
    m = run_measured(cmd, **measure)
    rec = dict(row=row, round=rnd, loadavg1_before=load1, **{k: v for k, v in asdict(m).items() if k != "stdout"})
    try:
        rec.update(parse(m.stdout) if m.returncode == 0 else dict(tok_s=None))
    except (ValueError, KeyError) as e:
        rec.update(tok_s=None, parse_error=str(e), stdout_tail=m.stdout[-2000:])
    if rec["tok_s"] is None:
        why = (f"killed by the memory cgroup's OOM killer at --limit {m.limit_bytes / 2**20:.0f} MiB" if m.oom_kills
               else rec.get("parse_error") or m.stderr_tail[-300:])
        _step(f"{row} round {rnd + 1} FAILED (exit {m.returncode}): {why}")
    else:
        early = "  (stopped early at EOS: fewer decode steps)" if rec.get("finish_reason") == "stop" else ""
        _step(f"round {rnd + 1} {row:<12} {rec['tok_s']:7.2f} tok/s  (wall {m.wall_s:.1f} s, "
              f"peak RSS {m.max_rss_bytes / 2**20:.0f} MiB, load {load1:.2f}){early}")
    return rec


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    gguf = resolve_gguf(args)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    bindir = build_llamacpp(args.jobs) if LLAMA_ROW in args.rows else None
    cli = HobbitCLI.detect()
    if not (cli.convert_dense or cli.run_dense) and any(r != LLAMA_ROW for r in args.rows):
        raise SystemExit("error: neither `hobbit convert` nor `hobbit run` takes --dense any more; "
                         "adapt HobbitCLI in benchmarks/peer_llamacpp.py to how hobbit now picks dense precision")
    measure = dict(env=env, limit_bytes=args.limit_bytes, drop_caches=args.drop_caches, timeout_s=args.timeout)
    info = dict(machine_info(), loadavg_before=os.getloadavg(), started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    runs = []
    with tempfile.TemporaryDirectory(prefix="peer-stores-") as tmp:
        stores = convert_stores(cli, gguf, args.rows, Path(tmp), env)
        for rnd in range(args.repeats):  # interleaved: every round runs every row once
            for row in args.rows:
                if row == LLAMA_ROW:
                    cmd = llama_bench_cmd(bindir, gguf, args.tokens, args.threads, args.llama_args.split())
                    runs.append(measure_row(row, rnd, cmd, parse_llama_bench, **measure))
                else:
                    cmd = cli.run_cmd(stores[row], row.removeprefix("hobbit-"), args.tokens, args.threads)
                    runs.append(measure_row(row, rnd, cmd, parse_hobbit, **measure))
    info["loadavg_after"] = os.getloadavg()
    llama = next((r for r in runs if r["row"] == LLAMA_ROW and r.get("tok_s") is not None), {})
    info.update(llama_cpp_build_commit=llama.get("build_commit"), llama_cpp_build_number=llama.get("build_number"))
    summary = summarize(runs, args.rows)
    print(markdown_table(summary, args.tokens))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        config = dict(gguf=str(gguf), gguf_bytes=gguf.stat().st_size, rows=args.rows, repeats=args.repeats,
                      tokens=args.tokens, threads=args.threads, llama_args=args.llama_args, limit_bytes=args.limit_bytes,
                      drop_caches=args.drop_caches, hobbit_dense_at=asdict(cli),
                      method="llama-bench -p 0 -n N -r 1 (tg from empty context, after its warm-up); hobbit run "
                             "--prompt-ids 1 --max-new-tokens N+1 (N decode steps, no warm-up); fresh process each")
        args.json.write_text(json.dumps(dict(machine=info, config=config, summary=summary, runs=runs), indent=1) + "\n")
        _step(f"wrote {args.json}")
    return 0 if all(s["best_tok_s"] is not None for s in summary.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
