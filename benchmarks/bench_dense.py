"""Dense SmolLM2-135M decode speed and memory per dense precision (hobbit), optionally vs transformers.

    python benchmarks/bench_dense.py [--dense bf16,int8,int4,auto] [--tokens 64] [--repeats 3]
                                     [--transformers] [--json runs/dense.json]

The Q4_1 GGUF is converted once per dense precision (`hobbit convert --dense X`). Every run is a
fresh process on 1 torch thread (so RSS figures are its own), greedy, the same prompt; runs are
interleaved over the variants so drift on a shared machine hits all alike, and the best of
`repeats` is reported. Per run: decode tok/s (generate), the fastest single decode step (ms), and
engine.memory() after the run (RSS before loading = baseline; dense, KV, experts).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

PROMPT = "The history of the Shire begins with the wandering days of the hobbits,"


def run_hobbit(store: str, tokens: int) -> dict:
    """One measurement, in this (fresh) process."""
    import torch

    import hobbit
    eng = hobbit.load(store, policy="resident")
    ids = eng.tokenizer.encode(PROMPT)
    eng.generate(ids, max_new_tokens=4, stop_token_ids=[])  # warm-up
    out = eng.generate(ids, max_new_tokens=tokens, stop_token_ids=[])
    steps = []
    with torch.inference_mode():
        for i in range(tokens):  # single decode steps at positions past the prompt
            t = time.perf_counter()
            eng.model.forward(torch.tensor([out.token_ids[i]]), len(ids) + i)
            steps.append(time.perf_counter() - t)
    mem = eng.memory()
    eng.close()
    return dict(decode_tok_s=out.stats["decode_tok_s"], min_step_ms=min(steps) * 1e3,
                median_step_ms=sorted(steps)[len(steps) // 2] * 1e3, memory=mem)


def run_transformers(gguf: str, tokens: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from pathlib import Path
    g = Path(gguf)
    model = AutoModelForCausalLM.from_pretrained(g.parent, gguf_file=g.name, dtype=torch.bfloat16).eval()
    x = torch.tensor([AutoTokenizer.from_pretrained(g.parent, gguf_file=g.name).encode(PROMPT)])
    with torch.inference_mode():
        model.generate(x, max_new_tokens=4, do_sample=False, min_new_tokens=4)
        t0 = time.perf_counter()
        model.generate(x, max_new_tokens=1, do_sample=False)  # prefill + first token, as hobbit's prefill_s
        t1 = time.perf_counter()
        model.generate(x, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        t2 = time.perf_counter()
    return dict(decode_tok_s=(tokens - 1) / ((t2 - t1) - (t1 - t0)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dense", default="bf16,int8,int4,auto", help="dense precisions to convert and time")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--transformers", action="store_true", help="also time transformers (bf16) on the GGUF")
    ap.add_argument("--json", default=None)
    ap.add_argument("--inner", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.inner:  # a child run: print one JSON line
        import torch
        torch.set_num_threads(1)
        kind, path = a.inner
        res = run_transformers(path, a.tokens) if kind == "transformers" else run_hobbit(path, a.tokens)
        print(json.dumps(res))
        return
    from hobbit.models.assets import asset_path
    from hobbit.store.convert import convert
    gguf = asset_path("smollm2-gguf")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory() as tmp:
        variants = []
        for fmt in a.dense.split(","):
            store = str(convert(gguf, f"{tmp}/{fmt}", progress=False, dense=fmt))
            variants.append((f"hobbit {fmt}", "hobbit", store))
        if a.transformers:
            variants.append(("transformers bf16", "transformers", str(gguf)))
        runs = []
        for r in range(a.repeats):  # interleaved, so drift hits every variant alike
            for name, kind, path in variants:
                out = subprocess.run([sys.executable, __file__, "--tokens", str(a.tokens), "--inner", kind, path],
                                     env=env, capture_output=True, text=True)
                if out.returncode:
                    sys.exit(f"{name} failed:\n{out.stderr[-3000:]}")
                runs.append(dict(engine=name, repeat=r, **json.loads(out.stdout.strip().splitlines()[-1])))
                x = runs[-1]
                extra = f", min step {x['min_step_ms']:.2f} ms, dense {x['memory']['dense_bytes'] / 2**20:.0f} MiB, " \
                        f"baseline RSS {x['memory']['baseline_rss_bytes'] / 2**20:.0f} MiB, " \
                        f"peak RSS {x['memory']['peak_rss_bytes'] / 2**20:.0f} MiB" if kind == "hobbit" else ""
                print(f"repeat {r} {name:>24}: {x['decode_tok_s']:7.2f} tok/s{extra}", flush=True)
    names = list(dict.fromkeys(x["engine"] for x in runs))
    best = {n: max(x["decode_tok_s"] for x in runs if x["engine"] == n) for n in names}
    fastest_step = {n: min(x["min_step_ms"] for x in runs if x["engine"] == n) for n in names if n.startswith("hobbit")}
    print("best:", ", ".join(f"{n} {v:.1f} tok/s" for n, v in best.items()))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(machine=dict(platform=platform.platform(), threads=1), tokens=a.tokens, runs=runs,
                           best=best, fastest_step_ms=fastest_step), f, indent=1)


if __name__ == "__main__":
    main()
