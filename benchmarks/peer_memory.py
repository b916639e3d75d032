"""hobbit vs llama.cpp on the same model under the same RAM limit (issue #9's headline benchmark).

    python benchmarks/peer_memory.py --store STORE --gguf codermoe-q4_0.gguf --high int4 --low int2 --tokens 48 \
        --repeats 2 --json results/peer_memory.json --plot results/peer_memory.png
    python benchmarks/peer_memory.py --replot results/peer_memory.json --plot results/peer_memory.png

The GGUF is `hobbit export STORE out.gguf --type q4_0` (or bf16), so both engines run one model; hobbit's high
tier is --high (int4 against Q4_0, bf16 against BF16). Every run is a fresh process inside a memory cgroup
(peer_common.run_measured: cgroup v1 memory.limit_in_bytes, which counts page cache, so llama.cpp's mmap is
really limited), page cache dropped before it; same prompt, 1 thread, greedy, --tokens decode steps
(llama-completion's `eval time`; hobbit run's decode_tok_s). llama.cpp runs twice per limit: as users run it
(weight repacking copies Q4_0 tensors into anonymous memory) and with --no-repack (all weights via mmap).

Limits: L(f) = dense + KV + f x experts + baseline, each term the larger of the two engines' (dense: hobbit's
dense.safetensors vs the GGUF's non-expert bytes; experts at the compared precision; KV: hobbit fp32 at its
256-position first allocation vs llama.cpp f16 at -c 256). Baselines are measured first, unlimited, from the
polled VmHWM: llama.cpp = peak RSS - GGUF bytes of `llama-completion --no-repack` on a tiny GGUF and on this
GGUF (the larger); hobbit = peak RSS - dense - KV - expert budget of `hobbit run --policy lru` at the largest f
(Python, torch, tokenizer, allocator, slot rounding). hobbit's --budget at L(f) is L(f) - its own baseline -
dense - KV. --own-fractions adds llama.cpp-only limits from its own sizes (where hobbit cannot start).
hobbit's dense term is what its calibration run holds (less the file-mapped embedding), so it follows
--hobbit-args, e.g. '--dense int4 --lm-head int8' (the dense weights as the Q4_0 export holds them).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer_common import HOBBIT, _step, build_llamacpp, machine_info, run_measured  # noqa: E402
from peer_llamacpp import parse_hobbit  # noqa: E402
from hobbit.runtime.config import read_tuned  # noqa: E402

MIB = 2**20
LLAMA = "llama.cpp"
LLAMA_ROWS = {LLAMA: [], "llama.cpp no-repack": ["--no-repack"]}  # repack (default) copies Q4_0 weights to RAM
POLICIES = ("ondemand", "lru", "lru+prefetch", "hobbit")
UNLIMITED = "unlimited"
CTX = 256  # llama.cpp -c; hobbit's KV cache starts at 256 positions and the run stays below that
PROMPT = '# Python 3\ndef fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'


# ---------------------------------------------------------------- sizes and limits (pure)

def store_sizes(manifest: dict, high: str, ctx: int = CTX, mapped_bytes: int = 0) -> dict:
    """hobbit's resident parts: dense bytes (less the file-mapped embedding, mapped_bytes: only looked up
    by row), all experts at `high`, its fp32 KV cache at ctx positions."""
    c = manifest["config"]
    experts = sum(b["nbytes"] for k, b in manifest["blobs"].items() if k.rsplit("/", 1)[1] == high)
    if not experts:
        raise ValueError(f"the store holds no {high} experts (it has {manifest.get('precisions')})")
    kv = len(c["sparse_layers"] or range(c["num_layers"])) * 2 * c["num_kv_heads"] * ctx * c["head_dim"] * 4
    return dict(dense_bytes=manifest["dense_bytes"] - mapped_bytes, expert_bytes=experts, kv_bytes=kv)


def mapped_embedding_bytes(dense_file: Path) -> int:
    """Bytes of the embedding hobbit leaves file-mapped (hobbit.store.dense.embedding_is_lookup)."""
    from hobbit.store.dense import EMBEDDING, embedding_is_lookup
    with open(dense_file, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    if not embedding_is_lookup(header):
        return 0
    start, end = header[EMBEDDING]["data_offsets"]
    return end - start


def gguf_sizes(tensors: dict[str, int], file_bytes: int, cfg: dict, ctx: int = CTX) -> dict:
    """llama.cpp's parts: expert tensors (`*_exps`), everything else in the file but the token embedding
    when the file has its own output.weight (mmap'd, looked up by row: as hobbit's), its f16 KV at -c ctx."""
    experts = sum(n for name, n in tensors.items() if "_exps" in name)
    if "output.weight" in tensors:
        file_bytes -= tensors.get("token_embd.weight", 0)
    kv = cfg["num_layers"] * 2 * cfg["num_kv_heads"] * ctx * cfg["head_dim"] * 2
    return dict(dense_bytes=file_bytes - experts, expert_bytes=experts, kv_bytes=kv)


def compute_limits(hobbit: dict, llama: dict, base_hobbit: int, base_llama: int, fractions: list[float]) -> list[dict]:
    """One entry per fraction: the shared limit, its terms, and hobbit's expert budget under it."""
    dense, kv = max(hobbit["dense_bytes"], llama["dense_bytes"]), max(hobbit["kv_bytes"], llama["kv_bytes"])
    experts, base = max(hobbit["expert_bytes"], llama["expert_bytes"]), max(base_hobbit, base_llama)
    out = []
    for f in fractions:
        limit = dense + kv + round(f * experts) + base
        budget = limit - base_hobbit - hobbit["dense_bytes"] - hobbit["kv_bytes"]
        out.append(dict(label=f"{f:.0%}", fraction=f, limit_bytes=limit, hobbit_budget_bytes=budget,
                        dense_bytes=dense, kv_bytes=kv, expert_part_bytes=round(f * experts), baseline_bytes=base))
    return out


def own_limits(llama: dict, base_llama: int, fractions: list[float]) -> list[dict]:
    """llama.cpp-only limits from its own sizes (smaller than hobbit's dense + baseline: hobbit cannot run there)."""
    return [dict(label=f"llama {f:.0%}", fraction=f, hobbit_budget_bytes=None, dense_bytes=llama["dense_bytes"],
                 kv_bytes=llama["kv_bytes"], expert_part_bytes=round(f * llama["expert_bytes"]), baseline_bytes=base_llama,
                 limit_bytes=llama["dense_bytes"] + llama["kv_bytes"] + round(f * llama["expert_bytes"]) + base_llama)
            for f in fractions]


def peak_rss(run: dict) -> int | None:
    """The command's own peak RSS (polled VmHWM), else getrusage's (which includes the forking harness)."""
    return run.get("hwm_bytes") or run.get("max_rss_bytes")


def owned_dense(stats: dict) -> int:
    """Dense bytes a hobbit run holds in RAM: all of them less the file-mapped embedding."""
    return stats["dense_bytes"] - stats.get("dense_mapped_bytes", 0)


def hobbit_baseline(stats: dict, max_rss: int) -> int:
    """Process memory of a hobbit run beyond its dense weights, KV cache and expert budget."""
    return max_rss - owned_dense(stats) - stats["kv_cache_bytes"] - (stats.get("budget_bytes") or 0)


# ---------------------------------------------------------------- commands and parsing

def llama_cmd(bindir: Path, gguf: Path, prompt: str, tokens: int, threads: int, extra: list[str] = ()) -> list[str]:
    # -n tokens+1: the first token comes from the prompt pass, so `eval time` times `tokens` decode steps
    return [str(bindir / "llama-completion"), "-m", str(gguf), "-p", prompt, "-n", str(tokens + 1), "-t", str(threads),
            "-tb", str(threads), "-c", str(CTX), "--temp", "0", "--seed", "0", "--no-warmup", "-no-cnv",
            "--ignore-eos", "--simple-io", *extra]


def hobbit_cmd(store: Path, policy: str, prompt_ids: list[int], tokens: int, threads: int, high: str,
               low: str | None, budget: int | None, trace: Path | None = None, extra: list[str] = ()) -> list[str]:
    cmd = [*HOBBIT, "run", str(store), "--prompt-ids", ",".join(map(str, prompt_ids)), "--max-new-tokens",
           str(tokens + 1), "--json", "--policy", policy, "--threads", str(threads), "--high", high]
    if low and policy == "hobbit":
        cmd += ["--low", low]
    if budget is not None and policy != "resident":
        cmd += ["--budget", str(budget)]
    return cmd + list(extra) + (["--trace", str(trace)] if trace else [])


_PERF = {"prompt": re.compile(r"prompt eval time =\s*([\d.]+) ms /\s*(\d+) tokens"),
         "eval": re.compile(r"(?<!prompt )eval time =\s*([\d.]+) ms /\s*(\d+) runs"),
         "load": re.compile(r"load time =\s*([\d.]+) ms")}


def parse_llama_completion(stderr: str, stdout: str = "") -> dict:
    """decode tok/s, prefill s and token counts from llama-completion's `common_perf_print` lines."""
    m = {k: r.search(stderr) for k, r in _PERF.items()}
    if not (m["prompt"] and m["eval"]):
        raise ValueError("llama-completion printed no `prompt eval time` / `eval time` lines")
    eval_ms, runs = float(m["eval"][1]), int(m["eval"][2])
    return dict(tok_s=runs / (eval_ms / 1e3) if eval_ms else None, prefill_s=float(m["prompt"][1]) / 1e3,
                prompt_tokens=int(m["prompt"][2]), decode_steps=runs, decode_s=eval_ms / 1e3,
                load_s=float(m["load"][1]) / 1e3 if m["load"] else None, text=stdout)


HOBBIT_KEEP = ("bytes_read", "dense_bytes", "dense_mapped_bytes", "hit_rate", "loader_wait_s", "skipped", "selections",
               "budget_bytes", "cached_expert_bytes", "kv_cache_bytes", "baseline_rss_bytes", "prompt_tokens", "hits_by_precision", "misses_by_precision")


def parse_hobbit_run(stdout: str) -> dict:
    r = parse_hobbit(stdout)
    obj = json.loads(next(ln for ln in reversed(stdout.splitlines()) if ln.startswith("{")))
    s = obj.get("stats", obj)
    r.update({k: s[k] for k in HOBBIT_KEEP if k in s}, text=obj.get("text"), token_ids=obj.get("token_ids"))
    r["decode_steps"] = max(0, (s.get("generated_tokens") or 1) - 1)
    return r


# ---------------------------------------------------------------- plan, summary, table (pure)

def plan(limits: list[dict], policies: list[str], repeats: int, own: list[dict] = ()) -> list[tuple[int, str, str]]:
    """(round, row, limit label) for every run, interleaved: each round runs every row once; `own` limits are
    llama.cpp's only."""
    one = [(r, lim["label"]) for lim in limits for r in (*LLAMA_ROWS, *policies)]
    one += [(r, lim["label"]) for lim in own for r in LLAMA_ROWS]
    one += [(r, UNLIMITED) for r in (*LLAMA_ROWS, "resident")]
    return [(rnd, row, label) for rnd in range(repeats) for row, label in one]


def per_token(run: dict) -> float | None:
    """Bytes the process read from storage per decode step (model load and prefill included)."""
    steps = run.get("decode_steps")
    return run["read_bytes"] / steps if run.get("read_bytes") is not None and steps else None


def summarize(runs: list[dict]) -> list[dict]:
    """One row per (engine/policy, limit) in first-seen order; figures of its fastest run, all runs listed."""
    keys = list(dict.fromkeys((r["row"], r["limit"]) for r in runs))
    out = []
    for row, limit in keys:
        mine = [r for r in runs if r["row"] == row and r["limit"] == limit]
        ok = [r for r in mine if r.get("tok_s") is not None]
        best = max(ok, key=lambda r: r["tok_s"], default=None)
        out.append(dict(row=row, limit=limit, limit_bytes=mine[0].get("limit_bytes"), tok_s=[r["tok_s"] for r in ok],
                        failed=len(mine) - len(ok), best_tok_s=best and best["tok_s"],
                        prefill_s=best and best.get("prefill_s"), read_per_token=best and per_token(best),
                        major_faults=best and best["major_faults"], max_rss_bytes=best and peak_rss(best),
                        cgroup_peak_bytes=best and best.get("cgroup_peak_bytes")))
    return out


def ratios(summary: list[dict], label: str) -> dict:
    """hobbit's best tok/s over llama.cpp's, lru's and ondemand's at one limit (None where a row failed)."""
    at = {s["row"]: s["best_tok_s"] for s in summary if s["limit"] == label}
    h = at.get("hobbit")
    return {f"hobbit_vs_{k.replace('.', '_').replace(' ', '_')}": (h / at[k] if h and at.get(k) else None)
            for k in (*LLAMA_ROWS, "lru", "ondemand", "lru+prefetch")}


def _f(x, fmt: str, scale: float = 1.0) -> str:
    return "-" if x is None else format(x / scale, fmt)


def markdown_table(summary: list[dict]) -> str:
    head = ["engine / policy", "limit", "limit MiB", "decode tok/s (best)", "all runs", "prefill s", "MiB read / token",
            "major faults", "peak RSS MiB (VmHWM)", "cgroup peak MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summary:
        runs = ", ".join([f"{v:.2f}" for v in s["tok_s"]] + ([f"{s['failed']} failed"] if s["failed"] else []))
        name = s["row"] if s["row"] in LLAMA_ROWS else f"hobbit {s['row']}"
        lines.append("| " + " | ".join([
            name, s["limit"], _f(s["limit_bytes"], ".0f", MIB), _f(s["best_tok_s"], ".2f"), runs,
            _f(s["prefill_s"], ".2f"), _f(s["read_per_token"], ".1f", MIB), _f(s["major_faults"], ".0f"),
            _f(s["max_rss_bytes"], ".0f", MIB), _f(s["cgroup_peak_bytes"], ".0f", MIB)]) + " |")
    return "\n".join(lines)


def plot(summary: list[dict], limits: list[dict], path: Path, config: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = {lim["label"]: lim["limit_bytes"] / MIB for lim in limits}
    for row in dict.fromkeys(s["row"] for s in summary):
        pts = sorted((xs[s["limit"]], s["best_tok_s"] or 0.0) for s in summary if s["row"] == row and s["limit"] in xs)
        name = row if row in LLAMA_ROWS else f"hobbit {row}"
        if pts:
            line, = ax.plot(*zip(*pts), marker="o", label=name)
        unl = [s["best_tok_s"] for s in summary if s["row"] == row and s["limit"] == UNLIMITED and s["best_tok_s"]]
        if unl:
            ax.axhline(unl[0], ls="--", lw=1, color=line.get_color() if pts else "gray", label=f"{name}, unlimited")
    ax.set_xlabel("memory limit (cgroup, MiB; page cache included)")
    ax.set_ylabel("decode tok/s (best run)")
    c = config  # the run's --gguf, --high, --threads
    ax.set_title(f"CoderMoE, llama.cpp {Path(c['gguf']).name} vs hobbit --high {c['high']}, {c['threads']} thread", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ---------------------------------------------------------------- running

def gguf_tensor_bytes(path: Path) -> dict[str, int]:
    from gguf import GGUFReader
    return {t.name: int(t.n_bytes) for t in GGUFReader(str(path)).tensors}


def measure(rnd: int, row: str, label: str, cmd: list[str], parse, env: dict, limit: int | None, timeout: float,
            **extra) -> dict:
    load1 = os.getloadavg()[0]
    m = run_measured(cmd, env=env, limit_bytes=limit, drop_caches=True, timeout_s=timeout)
    rec = dict(round=rnd, row=row, limit=label, loadavg1_before=load1, **extra,
               **{k: v for k, v in asdict(m).items() if k != "stdout"})
    try:
        rec.update(parse(m) if m.returncode == 0 else dict(tok_s=None))
    except (ValueError, KeyError, StopIteration) as e:
        rec.update(tok_s=None, parse_error=str(e), stdout_tail=m.stdout[-2000:])
    mb = f"{limit / MIB:.0f} MiB" if limit else "no limit"
    if rec["tok_s"] is None:
        why = "cgroup OOM kill" if m.oom_kills else rec.get("parse_error") or m.stderr_tail[-300:]
        _step(f"r{rnd + 1} {row} @ {label} ({mb}) FAILED (exit {m.returncode}): {why}")
    else:
        _step(f"r{rnd + 1} {row:<12} @ {label:>9} ({mb}): {rec['tok_s']:6.2f} tok/s, prefill {rec.get('prefill_s', 0):.2f} s, "
              f"read {m.read_bytes / MIB if m.read_bytes else 0:.0f} MiB, faults {m.major_faults}, wall {m.wall_s:.0f} s, load {load1:.1f}")
    return rec


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("--gguf", type=Path, required=True, help="`hobbit export STORE X.gguf --type q4_0|bf16`")
    ap.add_argument("--tiny-gguf", type=Path, default=None, help="llama.cpp's baseline GGUF (default: hobbit assets smollm2-gguf)")
    ap.add_argument("--high", default="int4", help="hobbit's high tier, the GGUF's precision (default int4)")
    ap.add_argument("--low", default=None, help="hobbit policy's low tier (default: hobbit's choice)")
    ap.add_argument("--fractions", default="0.10,0.25,0.50")
    ap.add_argument("--own-fractions", default="0.25", help="llama.cpp-only limits from its own sizes ('' for none)")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=32, help="decode steps timed per run")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--hobbit-args", default="", help="flags added to every hobbit run, e.g. '--dense int4 --lm-head int8'")
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--plot", type=Path, default=None)
    a = ap.parse_args(argv)
    a.fractions = [float(x) for x in a.fractions.split(",")]
    a.own_fractions = [float(x) for x in a.own_fractions.split(",") if x.strip()]
    a.policies = [p.strip() for p in a.policies.split(",") if p.strip()]
    a.hobbit_extra = shlex.split(a.hobbit_args)
    if a.repeats < 1 or a.tokens < 1 or not all(0 < f < 1 for f in a.fractions):
        ap.error("--repeats and --tokens must be >= 1, fractions in (0, 1)")
    return a


def belady_check(store: Path, ids: list[int], a, budget: int, env: dict, folder: Path) -> dict:
    """Record the routing of this prompt (resident run), then replay belady / lru / hobbit on it at `budget`."""
    trace = folder / "trace.jsonl.gz"
    subprocess.run(hobbit_cmd(store, "resident", ids, a.tokens, a.threads, a.high, None, None, trace,
                              a.hobbit_extra), env=env, check=True, stdout=subprocess.DEVNULL)
    out = {}
    for pol in ("belady", "lru", "hobbit"):
        cmd = [*HOBBIT, "simulate", str(trace), "--policy", pol, "--budget", str(budget), "--high", a.high, "--json",
               *(["--low", a.low] if a.low and pol == "hobbit" else [])]
        r = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
        out[pol] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


def replot(path: Path, png: Path) -> None:
    """Table and plot again from a written JSON (`--replot results/peer_memory.json --plot X.png`)."""
    d = json.loads(path.read_text())
    print(markdown_table(d["summary"]))
    plot(d["summary"], d["limits"] + d.get("own_limits", []), png, d["config"])


def main(argv: list[str] | None = None) -> int:
    if argv is None and sys.argv[1:2] == ["--replot"]:
        replot(Path(sys.argv[2]), Path(sys.argv[sys.argv.index("--plot") + 1]))
        return 0
    a = parse_args(argv)
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    bindir = build_llamacpp()
    manifest = json.loads((a.store / "manifest.json").read_text())
    from tokenizers import Tokenizer
    ids = Tokenizer.from_file(str(a.store / "tokenizer.json")).encode(a.prompt, add_special_tokens=False).ids
    tiny = a.tiny_gguf or Path(subprocess.run([*HOBBIT, "assets", "smollm2-gguf"], env=env, check=True,
                                              capture_output=True, text=True).stdout.strip().splitlines()[-1])
    sizes = dict(hobbit=store_sizes(manifest, a.high, mapped_bytes=mapped_embedding_bytes(a.store / manifest["dense_file"])),
                 llama=gguf_sizes(gguf_tensor_bytes(a.gguf), a.gguf.stat().st_size, manifest["config"]))
    info = dict(machine_info(), started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    lparse = lambda m: parse_llama_completion(m.stderr_tail, m.stdout)  # noqa: E731
    hparse = lambda m: parse_hobbit_run(m.stdout)  # noqa: E731
    _step(f"prompt: {len(ids)} tokens; sizes {json.dumps(sizes)}")
    # baselines, unlimited
    nr = ["--no-repack"]  # the repacked copy is weights, not process overhead: measure without it
    cal = [measure(0, "llama.cpp no-repack", "baseline-tiny", llama_cmd(bindir, tiny, a.prompt, a.tokens, a.threads, nr),
                   lparse, env, None, a.timeout, model_bytes=tiny.stat().st_size),
           measure(0, "llama.cpp no-repack", "baseline", llama_cmd(bindir, a.gguf, a.prompt, a.tokens, a.threads, nr),
                   lparse, env, None, a.timeout, model_bytes=a.gguf.stat().st_size)]
    b_cal = round(max(a.fractions) * sizes["hobbit"]["expert_bytes"])  # the largest budget: the fewest reads
    cal.append(measure(0, "lru", "baseline", hobbit_cmd(a.store, "lru", ids, a.tokens, a.threads, a.high, a.low, b_cal,
                                                        extra=a.hobbit_extra), hparse, env, None, a.timeout))
    if cal[2]["tok_s"] is None:
        raise SystemExit("the hobbit baseline run failed; see its error above")
    sizes["hobbit"]["dense_bytes"] = owned_dense(cal[2])  # as that run holds them (--hobbit-args may re-format)
    base_llama = max(peak_rss(r) - r["model_bytes"] for r in cal[:2])
    base_hobbit = hobbit_baseline(cal[2], peak_rss(cal[2]))
    limits = compute_limits(sizes["hobbit"], sizes["llama"], base_hobbit, base_llama, a.fractions)
    own = own_limits(sizes["llama"], base_llama, a.own_fractions)
    _step("limits: " + ", ".join(f"{x['label']} {x['limit_bytes'] / MIB:.0f} MiB (hobbit budget "
                                 f"{x['hobbit_budget_bytes'] / MIB:.0f} MiB)" for x in limits))
    by_label = {x["label"]: x for x in limits + own}
    mid = by_label.get("25%", limits[len(limits) // 2])
    with tempfile.TemporaryDirectory(prefix="peer-memory-") as tmp:
        try:
            sim = belady_check(a.store, ids, a, mid["hobbit_budget_bytes"], env, Path(tmp))
        except (subprocess.CalledProcessError, ValueError, KeyError) as e:
            sim = None
            _step(f"the belady replay failed: {e}")
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}
    config["tuned"] = [{k: v for k, v in r.items() if k != "search"} for r in read_tuned(a.store)]  # what hobbit runs with
    result = dict(machine=info, config=dict(config, prompt_ids=ids), sizes=sizes, calibration=cal,
                  baselines=dict(hobbit=base_hobbit, llama_cpp=base_llama), limits=limits, own_limits=own, simulate=sim)
    a.json.parent.mkdir(parents=True, exist_ok=True)
    runs = []
    for rnd, row, label in plan(limits, a.policies, a.repeats, own):
        lim = by_label.get(label)
        limit = lim["limit_bytes"] if lim else None
        if row in LLAMA_ROWS:
            cmd, parse = llama_cmd(bindir, a.gguf, a.prompt, a.tokens, a.threads, LLAMA_ROWS[row]), lparse
        else:
            cmd, parse = hobbit_cmd(a.store, row, ids, a.tokens, a.threads, a.high, a.low,
                                    lim["hobbit_budget_bytes"] if lim else None, extra=a.hobbit_extra), hparse
        runs.append(measure(rnd, row, label, cmd, parse, env, limit, a.timeout))
        summary = summarize(runs)  # written after every run: an interrupted benchmark keeps what it measured
        info.update(finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), runs_done=len(runs))
        result.update(summary=summary, ratios={x["label"]: ratios(summary, x["label"]) for x in limits}, runs=runs)
        a.json.write_text(json.dumps(result, indent=1) + "\n")
    print(markdown_table(summary))
    if a.plot:
        plot(summary, limits + own, a.plot, config)
    _step(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
