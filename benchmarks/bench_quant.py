"""quantize / prepare / linear time per format for one Qwen1.5-MoE-sized expert matrix, 1 thread.

Usage: python benchmarks/bench_quant.py [--n 2048] [--k 1408] [--group-size 64] [--out FILE.json]
Times are min over repeats (the machine is shared); linear runs on a hot (cache-resident) weight.
quantize/dequantize allocate full-size temporaries: with glibc's default mmap threshold they pay
page faults (2-4x slower); MALLOC_MMAP_THRESHOLD_=17179869184 MALLOC_TRIM_THRESHOLD_=17179869184 avoids that.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from hobbit.store import quant as Q


def best_ms(fn, reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2048, help="output features N")
    ap.add_argument("--k", type=int, default=1408, help="input features K")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--out", default="bench_quant.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    N, K, gs = args.n, args.k, args.group_size
    torch.manual_seed(0)
    w = torch.distributions.StudentT(4.0).sample((N, K)) * 0.01  # heavy-tailed, like real weights
    rows = []
    for fmt in Q.FORMATS:
        heavy = fmt in ("int3", "int2")  # HQQ formats: quantize takes ~0.1-1 s
        q = Q.quantize(w, fmt, gs)
        row = {"fmt": fmt,
               "quantize_ms": best_ms(lambda: Q.quantize(w, fmt, gs), 2 if heavy else 5, 0 if heavy else 1),
               "storage_bytes": Q.storage_nbytes(fmt, (N, K), gs),
               "rel_err": ((Q.dequantize(q, fmt, (N, K), gs) - w).norm() / w.norm()).item(),
               "dequantize_ms": best_ms(lambda: Q.dequantize(q, fmt, (N, K), gs), 5)}
        for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
            p = Q.prepare(q, fmt, (N, K), gs, dtype)
            row[f"prepare_{name}_ms"] = best_ms(lambda: Q.prepare(q, fmt, (N, K), gs, dtype), 10)
            row[f"prepared_{name}_bytes"] = p.nbytes
            row[f"kind_{name}"] = p.kind
            for T in (1, 4):
                x = torch.randn(T, K).to(dtype)
                row[f"linear_{name}_T{T}_ms"] = best_ms(lambda: Q.linear(x, p), 50, 5)
        rows.append(row)
        print(f"{fmt:5s} quantize {row['quantize_ms']:8.2f} ms  err {row['rel_err']:.4f}  "
              f"store {row['storage_bytes'] / 1e6:5.2f} MB  prepare bf16 {row['prepare_bf16_ms']:6.3f} ms "
              f"({row['kind_bf16']}, {row['prepared_bf16_bytes'] / 1e6:.2f} MB)  linear bf16 T=1 "
              f"{row['linear_bf16_T1_ms']:.3f} T=4 {row['linear_bf16_T4_ms']:.3f} ms | prepare fp32 "
              f"{row['prepare_fp32_ms']:6.3f} ms  linear fp32 T=1 {row['linear_fp32_T1_ms']:.3f} "
              f"T=4 {row['linear_fp32_T4_ms']:.3f} ms", flush=True)
    meta = {"shape": [N, K], "group_size": gs, "threads": 1, "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "machine": platform.machine(),
            "b64_fast_layout": Q._fast_layout(), "weight": "student-t(4)*0.01"}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
