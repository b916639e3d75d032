"""Decode-time (one token) expert compute: per-expert loop over slot views vs gathered alternatives.

At decode every selected expert sees the same x [1, H]. Candidates, bf16, 1 thread, weights rotated
through enough copies to come from DRAM:
  loop     per expert: gate/up linear, SiLU * up, down linear, weighted add (what offload.py runs:
           slot views, nothing copied)
  gather   index_select the k experts' weights out of a [E, ...] pool, one bmm for gate/up, one for down
  grouped  torch._grouped_mm over the whole pool with per-expert row offsets (no weight copy)

    python benchmarks/bench_expert_compute.py --json results/bench_expert_compute.json
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

SHAPES = {  # name: (hidden H, expert width I, top-k, experts per layer)
    "smolmoe": (576, 64, 2, 8),
    "codermoe": (1536, 544, 8, 16),
    "qwen3-30b-a3b": (2048, 768, 8, 128),
}


def best_us(fn, n: int, repeats: int = 5) -> float:
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return best * 1e6


def candidates(H: int, I: int, k: int, E: int, copies: int):
    pools = [(torch.randn(E, 2 * I, H).bfloat16(), torch.randn(E, H, I).bfloat16()) for _ in range(copies)]
    x = torch.randn(1, H).bfloat16()
    ids = list(range(1, 1 + k))
    idx = torch.tensor(ids)
    w = [1.0 / k] * k
    wt = torch.tensor(w).bfloat16()[None]  # [1, k]
    counts = torch.zeros(E, dtype=torch.int32)
    counts[idx] = 1
    offs = torch.cumsum(counts, 0).to(torch.int32)  # group g covers rows offs[g-1]:offs[g]
    turn = [0]

    def pool():
        turn[0] = (turn[0] + 1) % copies
        return pools[turn[0]]

    def loop():
        w13, w2 = pool()
        out = None
        for j, e in enumerate(ids):
            g, u = F.linear(x, w13[e]).chunk(2, dim=-1)  # [1, I] each
            y = F.linear(F.silu(g) * u, w2[e]).mul_(w[j])  # [1, H]
            out = y if out is None else out.add_(y)
        return out

    def gather():
        w13, w2 = pool()
        h = torch.bmm(w13.index_select(0, idx), x.expand(k, H)[..., None])[..., 0]  # [k, 2I]
        g, u = h.chunk(2, dim=-1)
        y = torch.bmm(w2.index_select(0, idx), (F.silu(g) * u)[..., None])[..., 0]  # [k, H]
        return wt @ y

    def grouped():
        w13, w2 = pool()
        h = torch._grouped_mm(x.expand(k, H).contiguous(), w13.transpose(1, 2), offs=offs)  # [k, 2I]
        g, u = h.chunk(2, dim=-1)
        return wt @ torch._grouped_mm(F.silu(g) * u, w2.transpose(1, 2), offs=offs)

    return {"loop": loop, "gather": gather, "grouped": grouped}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--mib", type=int, default=192, help="weights rotated over (MiB), so they come from DRAM")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = {}
    for name, (H, I, k, E) in SHAPES.items():
        nbytes = E * 3 * H * I * 2
        fns = candidates(H, I, k, E, copies=max(2, args.mib * 2**20 // nbytes))
        ref = fns["loop"]().float()
        row = {}
        for cand, fn in fns.items():
            try:
                err = ((fn().float() - ref).norm() / ref.norm()).item()
                row[cand] = dict(us=best_us(fn, n=max(5, 2000 // (k * E))), rel_err_vs_loop=err)
            except (RuntimeError, NotImplementedError) as e:
                row[cand] = dict(error=str(e).splitlines()[0])
        out[name] = dict(hidden=H, width=I, top_k=k, experts=E, **row)
        print(name, {c: (f"{v['us']:.1f} us" if "us" in v else v["error"]) for c, v in row.items()}, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(torch=torch.__version__, threads=1, results=out), f, indent=1)


if __name__ == "__main__":
    main()
