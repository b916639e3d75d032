"""Decode speed of resident vs cached vs on-demand experts on one store, in one process.

    python benchmarks/bench_offload.py STORE [--policies resident,lru,ondemand] [--budget 25%]
        [--tokens 64] [--repeats 3] [--json out.json]

Prompts are random token ids (speed only). The store's page cache is dropped before every run,
policies are interleaved across repeats so drift hits them alike, and the best repeat is reported.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch

import hobbit
from hobbit.lab.bench import load_overhead


def run_once(store: str, policy: str, budget: str, tokens: int, seed: int) -> dict:
    eng = hobbit.load(store, policy=policy, budget=None if policy in ("resident", "ondemand") else budget)
    prompt = torch.randint(0, eng.config.vocab_size, (16,), generator=torch.Generator().manual_seed(seed)).tolist()
    eng.store.drop_page_cache()
    eng.generate(prompt[:4], max_new_tokens=4, stop_token_ids=[])  # warm-up (allocator, kernels)
    eng.store.drop_page_cache()
    t0 = time.perf_counter()
    out = eng.generate(prompt, max_new_tokens=tokens, stop_token_ids=[])
    wall = time.perf_counter() - t0
    s = out.stats
    eng.close()
    n = max(1, s["generated_tokens"] - 1)
    return dict(policy=policy, budget_bytes=s["budget_bytes"], decode_tok_s=s["decode_tok_s"], prefill_s=s["prefill_s"],
                wall_s=wall, hit_rate=s["hit_rate"], bytes_read=s["bytes_read"],
                loader_wait_frac=s["loader_wait_s"] / max(1e-9, s["prefill_s"] + s["decode_s"]),
                bytes_per_token=s["bytes_read"] / (n + 1), peak_rss_bytes=s["peak_rss_bytes"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("store")
    ap.add_argument("--policies", default="resident,lru,ondemand")
    ap.add_argument("--budget", default="25%")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    runs = []
    for r in range(a.repeats):
        for policy in a.policies.split(","):
            res = run_once(a.store, policy, a.budget, a.tokens, seed=r)
            res["repeat"] = r
            runs.append(res)
            print(f"repeat {r} {policy:>9}: {res['decode_tok_s']:7.2f} tok/s  hit {res['hit_rate']:.1%}  "
                  f"{res['bytes_per_token'] / 2**20:7.1f} MiB/token  loader wait {res['loader_wait_frac']:.0%}", flush=True)
    best = {p: max((x for x in runs if x["policy"] == p), key=lambda x: x["decode_tok_s"]) for p in a.policies.split(",")}
    print("\nbest of", a.repeats)
    for p, x in best.items():
        print(f"  {p:>9}: {x['decode_tok_s']:7.2f} tok/s")
    overhead = load_overhead(a.store, list(best.values()))
    if overhead:
        print(f"load overhead ratio {overhead['load_overhead_ratio']:.2f} (ondemand - resident per token over the "
              f"raw reads of its {overhead['bytes_per_token'] / 2**20:.1f} MiB at {overhead['disk_read_gbps']:.2f} GB/s)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(machine=dict(platform=platform.platform(), processor=platform.processor(),
                                        torch=torch.__version__, threads=torch.get_num_threads()),
                           store=a.store, budget=a.budget, tokens=a.tokens, runs=runs, best=best,
                           load_overhead=overhead), f, indent=1)


if __name__ == "__main__":
    main()
