"""ms per gpt-oss-20b expert (w13 [5760, 2880] + w2 [2880, 2880]) at one token, bf16 activations, for the
ways torch on this CPU can compute with MXFP4 experts; `python benchmarks/bench_mxfp4.py [--threads N]`.

  reference   transformers' recipe (nibble lookups, ldexp) to fp32, then F.linear
  hf_bf16     transformers' convert_moe_packed_tensors(dtype=bf16), then F.linear
  pair_times_scale  gather byte -> 2 bf16 (one word), then multiply by the block scales
  ours_fused_table  hobbit.store.mxfp4.linear: per 256 rows an int64 index scale << 8 | byte, one gather
                    from a (scale, byte) -> 2 bf16 table into a scratch buffer, then F.linear
  int4_split_x2     W = W1 + W2, both exact int4 (group 32): two int4 kernel calls (not built: 9 extra
                    bits per weight of RAM per slot)
  int4        the int4 tier's kernel on the same shapes (re-quantized, not MXFP4: the speed to beat)
  bf16        F.linear on weights already bf16 (lower bound: what a bf16 copy would cost, at 4x the RAM)
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from hobbit.store import mxfp4, quant

SHAPES = {"w13": (5760, 2880), "w2": (2880, 2880)}


def _int4_split(q: dict, shape: tuple[int, int]) -> tuple:
    """W = W1 + W2, each exactly an int4 matrix (group 32, zero 0, scale 2^(s-128)): 2v in [-12, 12] split
    as clamp(2v, -8, 7) + rest. Exact in value; costs a second kernel call and 9 bits per weight of RAM."""
    N, K = shape
    v2 = (mxfp4.dequantize({"blocks": q["blocks"], "scales": torch.full_like(q["scales"], 127)}) * 2).round()
    a = v2.clamp(-8, 7)
    sc = torch.ldexp(torch.ones(N, K // 32), q["scales"].long() - 128)
    out = []
    for part in (a, v2 - a):
        st = quant.int4_from_codes((part + 8).to(torch.uint8), sc, torch.zeros_like(sc))
        out.append(quant.prepare(st, "int4", shape, 32, torch.bfloat16))
    return tuple(out)


def timeit(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t0) / reps)
    return best * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    q = {}
    for name, (N, K) in SHAPES.items():
        q[name] = {"blocks": torch.randint(0, 256, (N, K // 2), generator=g, dtype=torch.uint8),
                   "scales": torch.randint(118, 126, (N, K // 32), generator=g, dtype=torch.uint8)}
    x = {n: torch.randn(1, K, generator=g).bfloat16() for n, (_, K) in SHAPES.items()}
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    lut = torch.tensor(mxfp4.FP4_VALUES)
    b = torch.arange(256)
    pair = torch.stack((lut[b & 15], lut[b >> 4]), -1).bfloat16().contiguous().view(torch.int32).view(-1)  # [256]
    scale = torch.ldexp(torch.ones(256), torch.arange(256) - 127).bfloat16()
    ref_w = {n: mxfp4.dequantize(t) for n, t in q.items()}
    int4 = {n: quant.prepare(quant.quantize(ref_w[n], "int4", 64), "int4", SHAPES[n], 64, torch.bfloat16) for n in q}
    bf16 = {n: w.bfloat16() for n, w in ref_w.items()}
    split = {n: _int4_split(q[n], SHAPES[n]) for n in q}

    def run(fn):
        return lambda: [fn(n) for n in SHAPES]

    def pair_times_scale(n):  # gather byte pairs (long index), then x the block scales: the step before ours
        N, K = SHAPES[n]
        w = torch.empty(N, K, dtype=torch.bfloat16)
        torch.gather(pair, 0, q[n]["blocks"].reshape(-1).long(), out=w.view(torch.int32).view(-1))
        w.view(N, K // 32, 32).mul_(scale[q[n]["scales"].int()][..., None])
        return F.linear(x[n], w)

    def hf(n):
        N, K = SHAPES[n]
        w = convert_moe_packed_tensors(q[n]["blocks"].view(1, N, K // 32, 16), q[n]["scales"][None])[0]  # [K,N]
        return F.linear(x[n], w.T)

    ways = {
        "reference": run(lambda n: F.linear(x[n].float(), mxfp4.dequantize(q[n]))),
        "hf_bf16": run(hf),
        "pair_times_scale": run(pair_times_scale),
        "ours_fused_table": run(lambda n: mxfp4.linear(x[n], q[n]["blocks"], q[n]["scales"], SHAPES[n])),
        "int4_split_x2": run(lambda n: quant.linear(x[n], split[n][0]) + quant.linear(x[n], split[n][1])),
        "int4": run(lambda n: quant.linear(x[n], int4[n])),
        "bf16": run(lambda n: F.linear(x[n], bf16[n])),
    }
    want = {n: F.linear(x[n].float(), ref_w[n]) for n in SHAPES}
    for n in SHAPES:
        assert torch.equal(mxfp4.linear(x[n], q[n]["blocks"], q[n]["scales"], SHAPES[n]), F.linear(x[n], bf16[n]))
        assert torch.equal(pair_times_scale(n), F.linear(x[n], bf16[n]))
    out = {k: round(timeit(f, args.reps), 2) for k, f in ways.items()}
    err = {n: {"ours": (F.linear(x[n], bf16[n]).float() - want[n]).abs().max().item(),
               "int4_split_x2": ((quant.linear(x[n], split[n][0]) + quant.linear(x[n], split[n][1])).float()
                                 - want[n]).abs().max().item(),
               "max_abs_output": want[n].abs().max().item()} for n in SHAPES}
    doc = {"threads": args.threads, "ms_per_expert_one_token": out, "shapes": SHAPES,
           "max_abs_error_vs_fp32_matmul": err, "torch": torch.__version__}
    print(json.dumps(doc, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
