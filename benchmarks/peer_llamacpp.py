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

`run_measured` runs any command, optionally under a memory limit in a child memory cgroup (v1
`memory.limit_in_bytes`, else v2 `memory.max`; needs root), and reports wall time, peak RSS, major faults,
bytes read from storage and the cgroup's peak usage (page cache included).
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

LLAMA_CPP_PYTHON = "0.3.36"  # pinned sdist whose vendor/llama.cpp we build
TARGETS = ("llama-bench", "llama-completion", "llama-simple", "llama-perplexity")
CMAKE_FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF",
               "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF")
LLAMA_ROW = "llama.cpp"
HOBBIT_DENSE = ("auto", "bf16", "fp32", "int8", "int4")  # hobbit-<dense> rows
HOBBIT = [sys.executable, "-m", "hobbit.cli"]    # the `hobbit` command, in this interpreter's environment
REPO = Path(__file__).resolve().parents[1]


def _step(msg: str) -> None:
    print(f"[peer] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- building llama.cpp

def peers_dir() -> Path:
    base = os.environ.get("HOBBIT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hobbit"
    return Path(base).expanduser() / "peers"


def build_llamacpp(jobs: int = 2, root: Path | None = None) -> Path:
    """The bin/ folder holding llama-bench etc., building it first if missing (idempotent; ~4-6 min on 2 cores)."""
    root = root or peers_dir() / f"llama-cpp-python-{LLAMA_CPP_PYTHON}"
    bindir = root / "build" / "bin"
    if all((bindir / t).is_file() for t in TARGETS):
        return bindir
    for tool in ("cmake", "make", "c++"):
        if not shutil.which(tool):
            raise RuntimeError(f"building llama.cpp needs `{tool}` on PATH; install it (apt-get install cmake build-essential)")
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second harness waits for the first one's build, then finds it
        if not all((bindir / t).is_file() for t in TARGETS):
            _build(root, jobs)
    return bindir


def _build(root: Path, jobs: int) -> None:
    src, build = root / "src", root / "build"
    if not (src / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
        dl = root / "sdist"
        _step(f"downloading llama-cpp-python=={LLAMA_CPP_PYTHON} sdist (no deps) into {dl}")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
                        "-d", str(dl), f"llama-cpp-python=={LLAMA_CPP_PYTHON}"], check=True)
        tgz = next(dl.glob("llama_cpp_python-*.tar.gz"), None)
        if tgz is None:
            raise RuntimeError(f"pip download left no llama_cpp_python-*.tar.gz in {dl}; check PyPI access")
        _step(f"unpacking {tgz.name}")
        tmp = root / "src.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        with tarfile.open(tgz) as tf:
            tf.extractall(tmp, filter="data")
        shutil.rmtree(src, ignore_errors=True)
        next(tmp.iterdir()).rename(src)  # the sdist's single top folder becomes src/
        tmp.rmdir()
    _step("configuring llama.cpp with cmake")
    subprocess.run(["cmake", "-S", str(src / "vendor" / "llama.cpp"), "-B", str(build), *CMAKE_FLAGS],
                   check=True, stdout=subprocess.DEVNULL)
    _step(f"building {' '.join(TARGETS)} with -j{jobs} (minutes; cmake shows [percent])")
    subprocess.run(["cmake", "--build", str(build), "-j", str(jobs), "--target", *TARGETS], check=True)


# ---------------------------------------------------------------- running a command, measured, under a memory limit

@dataclass
class Measured:
    cmd: list[str]
    returncode: int
    wall_s: float
    stdout: str
    stderr_tail: str
    max_rss_bytes: int                 # getrusage of the child (its largest RSS)
    major_faults: int
    read_bytes: int | None             # /proc/PID/io read_bytes: bytes that came from storage
    limit_bytes: int | None = None
    cgroup_peak_bytes: int | None = None  # the cgroup's peak usage, page cache included (limit runs only)
    oom_kills: int | None = None          # kills by the cgroup's OOM killer (limit runs only)


def parse_size(s: str) -> int:
    """'2GiB', '512MiB', '1.5G', '4096' -> bytes."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?B)?\s*", s, re.IGNORECASE)
    if not m:
        raise ValueError(f"bad size {s!r}; write bytes or e.g. 512MiB, 2GiB")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " "))


def _own_cgroup(controller_line: str, proc_cgroup: str) -> str | None:
    """The path after `<id>:<controller_line>:` in /proc/self/cgroup text ('memory' for v1, '' for v2)."""
    for line in proc_cgroup.splitlines():
        _, ctrls, path = line.split(":", 2)
        if (controller_line in ctrls.split(",")) if controller_line else ctrls == "":
            return path
    return None


def make_memory_cgroup(limit_bytes: int, name: str) -> tuple[Path, str]:
    """A fresh child of this process's memory cgroup with the limit written; returns (folder, 'v1'|'v2')."""
    text = Path("/proc/self/cgroup").read_text()
    tried = []
    v1 = _own_cgroup("memory", text)
    if v1 is not None and Path("/sys/fs/cgroup/memory").is_dir():
        d = Path("/sys/fs/cgroup/memory") / v1.lstrip("/") / name
        try:
            d.mkdir(exist_ok=True)
            (d / "memory.limit_in_bytes").write_text(str(limit_bytes))
            return d, "v1"
        except OSError as e:
            tried.append(f"v1 {d}: {e}")
    v2 = _own_cgroup("", text)
    for mount in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
        if v2 is not None and (mount / "cgroup.controllers").is_file():
            parent = mount / v2.lstrip("/")
            d = parent / name
            try:
                if "memory" not in (parent / "cgroup.subtree_control").read_text().split():
                    (parent / "cgroup.subtree_control").write_text("+memory")
                d.mkdir(exist_ok=True)
                (d / "memory.max").write_text(str(limit_bytes))
                return d, "v2"
            except OSError as e:
                tried.append(f"v2 {d}: {e}")
    raise RuntimeError("cannot make a memory-limited cgroup: " + ("; ".join(tried) or "no memory controller found")
                       + ". Run as root on a machine whose cgroup memory controller is mounted writable, "
                         "or run without --limit")


def drop_page_cache() -> None:
    """sync, then drop clean page cache (root only), so every run reads its weights from storage."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as e:
        raise RuntimeError(f"cannot drop the page cache ({e}); run as root or without --drop-caches") from e


def run_measured(cmd: list[str], env: dict | None = None, limit_bytes: int | None = None,
                 drop_caches: bool = False, timeout_s: float | None = None) -> Measured:
    """Run cmd to completion (optionally in a fresh memory cgroup capped at limit_bytes) and measure it."""
    if drop_caches:
        drop_page_cache()
    cg, version = make_memory_cgroup(limit_bytes, f"peer-{os.getpid()}-{time.monotonic_ns()}") if limit_bytes else (None, None)

    def enter_cgroup() -> None:  # runs in the child between fork and exec, so the command starts already limited
        with open(cg / "cgroup.procs", "w") as f:
            f.write(str(os.getpid()))

    try:
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:  # files, not pipes: no deadlock
            t0 = time.perf_counter()
            p = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, preexec_fn=enter_cgroup if cg else None)
            timer = threading.Timer(timeout_s or 0, p.kill)
            if timeout_s:
                timer.start()
            os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOWAIT)  # exited but not reaped: /proc/PID/io still readable
            wall = time.perf_counter() - t0
            timer.cancel()
            try:
                read_bytes = int(re.search(r"^read_bytes: (\d+)", Path(f"/proc/{p.pid}/io").read_text(), re.M)[1])
            except (OSError, TypeError):
                read_bytes = None
            _, status, ru = os.wait4(p.pid, 0)
            p.returncode = os.waitstatus_to_exitcode(status)  # tell Popen it's reaped
            out.seek(0)
            err.seek(0)
            m = Measured(cmd=[str(c) for c in cmd], returncode=p.returncode, wall_s=wall,
                         stdout=out.read().decode(errors="replace"), stderr_tail=err.read().decode(errors="replace")[-2000:],
                         max_rss_bytes=ru.ru_maxrss * 1024, major_faults=ru.ru_majflt, read_bytes=read_bytes,
                         limit_bytes=limit_bytes)
        if cg:
            peak = cg / ("memory.max_usage_in_bytes" if version == "v1" else "memory.peak")
            m.cgroup_peak_bytes = int(peak.read_text()) if peak.is_file() else None
            events = (cg / ("memory.oom_control" if version == "v1" else "memory.events")).read_text()
            m.oom_kills = int(re.search(r"^oom_kill (\d+)", events, re.M)[1]) if "oom_kill " in events else None
        return m
    finally:
        if cg:
            try:
                cg.rmdir()  # v1 moves leftover page-cache charges to the parent
            except OSError:
                pass


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


def hobbit_has_option(sub: str, option: str) -> bool:
    """Whether `hobbit <sub> --help` lists option (the CLI moves options between commands over time)."""
    r = subprocess.run([*HOBBIT, sub, "--help"], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"`hobbit {sub} --help` failed: {r.stderr.strip()[-500:]}; is hobbit importable "
                           f"(PYTHONPATH=src or pip install -e .)?")
    return re.search(rf"(^|\s|\[){re.escape(option)}(?![\w-])", r.stdout) is not None


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


def machine_info() -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    git = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True, text=True)
    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = None
    flags = next((ln.split(":", 1)[1].split() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("flags")), [])
    return dict(cpu=cpu, cpus=os.cpu_count(), isa=sorted(f for f in flags if f.startswith(("avx", "amx", "fma"))), kernel=platform.release(), python=platform.python_version(),
                torch=torch_version, hobbit_git=git.stdout.strip() or None, llama_cpp_python=LLAMA_CPP_PYTHON,
                mem_total_kib=int(Path("/proc/meminfo").read_text().split()[1]))


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
